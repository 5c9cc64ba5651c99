"""`TensorBoardLogger`: scalars and hyperparameters as TensorBoard event files, via tensorboardX."""

import json
import os
import re
from typing import Any, Dict

from lightms.loggers.logger import Logger


def next_version(root: str) -> int:
    """Returns one more than the highest `version_N` folder under `root` (0 if none)."""
    if not os.path.isdir(root):
        return 0
    found = [int(m.group(1)) for d in os.listdir(root) if (m := re.fullmatch(r"version_(\d+)", d))]
    return max(found) + 1 if found else 0


def write_hparams_yaml(path: str, params: Dict[str, Any]) -> None:
    """Writes `params` as YAML (each value as JSON, which YAML reads)."""
    with open(path, "w", encoding="utf-8") as handle:
        for key, value in params.items():
            try:
                text = json.dumps(value)
            except TypeError:
                text = json.dumps(repr(value))
            handle.write(f"{key}: {text}\n")


class TensorBoardLogger(Logger):
    """Writes to `save_dir/name/version_N`, N chosen as the next free number.

    Args:
        save_dir: The root folder.
        name: Experiment folder under `save_dir`.
        version: An int (folder `version_<int>`), a string (used as the folder name), or
            None for the next free number.
    """

    def __init__(self, save_dir: str, name: str = "lightning_logs", version=None):
        self._save_dir = os.fspath(save_dir)
        self._name = name or ""
        self._version = version
        self._writer = None

    @property
    def name(self) -> str:
        return self._name

    @property
    def version(self):
        if self._version is None:
            self._version = next_version(os.path.join(self._save_dir, self._name))
        return self._version

    @property
    def log_dir(self) -> str:
        version = self.version
        folder = version if isinstance(version, str) else f"version_{version}"
        return os.path.join(self._save_dir, self._name, folder)

    @property
    def experiment(self):
        """The tensorboardX `SummaryWriter`, created on first use."""
        if self._writer is None:
            from tensorboardX import SummaryWriter

            os.makedirs(self.log_dir, exist_ok=True)
            self._writer = SummaryWriter(logdir=self.log_dir)
        return self._writer

    def log_metrics(self, metrics: Dict[str, float], step: int) -> None:
        for name, value in metrics.items():
            self.experiment.add_scalar(name, value, global_step=step)

    def log_hyperparams(self, params: Dict[str, Any]) -> None:
        from tensorboardX.summary import hparams

        writer = self.experiment
        write_hparams_yaml(os.path.join(self.log_dir, "hparams.yaml"), params)
        clean = {k: v if isinstance(v, (int, float, str, bool)) else repr(v) for k, v in params.items()}
        for summary in hparams(clean, {}):
            writer.file_writer.add_summary(summary)

    def save(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def finalize(self, status: str) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
