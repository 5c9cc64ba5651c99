"""`CSVLogger`: metrics as `metrics.csv` and hyperparameters as `hparams.yaml`."""

import csv
import os
from typing import Any, Dict, List

from lightms.loggers.logger import FolderLogger, write_hparams_yaml


class CSVLogger(FolderLogger):
    """Writes `save_dir/name/version_N/metrics.csv`, one row per logging call.

    Columns are the union of all metric names seen, plus `step`; a metric absent
    from a row is left empty. The file is rewritten on `save` so that new columns
    can appear mid-run. A `metrics.csv` already in the folder (a run logging into an
    existing version, say to continue it) is kept: its rows come first.

    Args:
        save_dir: The root folder.
        name: Experiment folder under `save_dir`.
        version: An int, a string folder name, or None for the next free number.
    """

    def __init__(self, save_dir: str, name: str = "lightning_logs", version=None):
        super().__init__(save_dir, name, version)
        self._rows: List[Dict[str, Any]] = []
        self._earlier_rows = None  # the rows of a metrics.csv this logger found, read at its first save

    def log_metrics(self, metrics: Dict[str, float], step: int) -> None:
        self._rows.append({**metrics, "step": step})

    def log_hyperparams(self, params: Dict[str, Any]) -> None:
        os.makedirs(self.log_dir, exist_ok=True)
        write_hparams_yaml(os.path.join(self.log_dir, "hparams.yaml"), params)

    def save(self) -> None:
        if not self._rows:
            return
        os.makedirs(self.log_dir, exist_ok=True)
        path = os.path.join(self.log_dir, "metrics.csv")
        if self._earlier_rows is None:
            self._earlier_rows = []
            if os.path.exists(path):
                with open(path, newline="", encoding="utf-8") as handle:
                    self._earlier_rows = list(csv.DictReader(handle))
        rows = self._earlier_rows + self._rows
        columns: List[str] = []
        for row in rows:
            columns.extend(key for key in row if key not in columns)
        with open(path + ".tmp", "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)
        os.replace(path + ".tmp", path)
