"""`Logger`: the interface the trainer writes metrics and hyperparameters through."""

import json
import os
import re
from typing import Any, Dict, Optional


class Logger:
    """Receives metrics at optimizer steps and hyperparameters once per run.

    Subclasses implement `log_metrics` and `log_hyperparams`; `finalize` flushes
    and closes. Only rank 0 will call them once data-parallel training lands.
    """

    @property
    def name(self) -> str:
        """The experiment name."""
        return type(self).__name__

    @property
    def version(self):
        """The run's version within the experiment."""
        return 0

    @property
    def log_dir(self) -> Optional[str]:
        """The folder this run writes to, or None."""
        return None

    def log_metrics(self, metrics: Dict[str, float], step: int) -> None:
        """Records `metrics` (name to float) at optimizer step `step`."""
        raise NotImplementedError

    def log_hyperparams(self, params: Dict[str, Any]) -> None:
        """Records the run's hyperparameters."""
        raise NotImplementedError

    def save(self) -> None:
        """Flushes pending writes."""

    def finalize(self, status: str) -> None:
        """Flushes and closes at the end of a run ("success", "failed" or "interrupted")."""
        self.save()


def next_version(root: str) -> int:
    """Returns one more than the highest `version_N` folder under `root` (0 if none)."""
    if not os.path.isdir(root):
        return 0
    found = [int(m.group(1)) for d in os.listdir(root) if (m := re.fullmatch(r"version_(\d+)", d))]
    return max(found) + 1 if found else 0


def write_hparams_yaml(path: str, params: Dict[str, Any]) -> str:
    """Writes `params` as YAML (each value as JSON, which YAML reads), never over another run's file.

    A run logging into an existing version folder (an explicit `version`) whose `hparams.yaml`
    holds other values writes `hparams-v1.yaml` (or -v2, ...) beside it.

    Returns:
        The path written (or found holding the same text).
    """
    lines = []
    for key, value in params.items():
        try:
            text = json.dumps(value)
        except TypeError:
            text = json.dumps(repr(value))
        lines.append(f"{key}: {text}\n")
    content = "".join(lines)
    stem, extension = os.path.splitext(path)
    version = 0
    while os.path.exists(path):
        with open(path, encoding="utf-8") as handle:
            if handle.read() == content:
                return path
        version += 1
        path = f"{stem}-v{version}{extension}"
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(content)
    return path


class FolderLogger(Logger):
    """A logger that writes into `save_dir/name/version_N`, N the next free number.

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
