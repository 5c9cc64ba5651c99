"""`TensorBoardLogger`: scalars and hyperparameters as TensorBoard event files, via tensorboardX."""

import os
from typing import Any, Dict

from lightms.loggers.logger import FolderLogger, write_hparams_yaml


class TensorBoardLogger(FolderLogger):
    """Writes TensorBoard event files through tensorboardX (arguments as `FolderLogger`)."""

    def __init__(self, save_dir: str, name: str = "lightning_logs", version=None):
        super().__init__(save_dir, name, version)
        self._writer = None

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
