"""`Logger`: the interface the trainer writes metrics and hyperparameters through."""

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
