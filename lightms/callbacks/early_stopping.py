"""`EarlyStopping`: stop fit when a monitored value stops improving."""

import math
import warnings
from typing import Optional

from lightms.callbacks.callback import Callback


class EarlyStopping(Callback):
    """Stops training when `monitor` has not improved by `min_delta` for `patience` checks.

    As in Lightning, the check runs at each training epoch end when the run validates
    exactly there (every epoch, at its end) or not at all, so that it sees validation
    and training epoch values alike; otherwise after each validation. A value of 0.0
    is a value like any other.

    Args:
        monitor: Name in `trainer.callback_metrics`.
        min_delta: Smallest change that counts as an improvement.
        patience: Checks without improvement before stopping.
        mode: "min" or "max".
        strict: Raise if `monitor` is missing (else warn once and skip).
        check_finite: Stop when the value is NaN or infinite.
        stopping_threshold: Stop as soon as the value is at least this good.
        divergence_threshold: Stop as soon as the value is this bad or worse.
        check_on_train_epoch_end: Check at training epoch ends (True) or after validations (False);
            None chooses as described above.

    Raises:
        ValueError: For a bad mode, a negative patience, or a negative min_delta.
    """

    order = 200  # after the module's hook, to see what it logged

    def __init__(self, monitor: str, min_delta: float = 0.0, patience: int = 3, mode: str = "min",
                 strict: bool = True, check_finite: bool = True, stopping_threshold: Optional[float] = None,
                 divergence_threshold: Optional[float] = None, check_on_train_epoch_end: Optional[bool] = None):
        if mode not in ("min", "max"):
            raise ValueError(f"EarlyStopping(mode=...) must be 'min' or 'max', got {mode!r}.")
        if not isinstance(patience, int) or patience < 0:
            raise ValueError(f"EarlyStopping(patience=...) must be an int >= 0, got {patience!r}.")
        if min_delta < 0:
            raise ValueError(f"EarlyStopping(min_delta=...) must be >= 0, got {min_delta}.")
        self.monitor = monitor
        self.min_delta = float(min_delta)
        self.patience = patience
        self.mode = mode
        self.strict = strict
        self.check_finite = check_finite
        self.stopping_threshold = stopping_threshold
        self.divergence_threshold = divergence_threshold
        self.check_on_train_epoch_end = check_on_train_epoch_end
        self.wait_count = 0
        self.stopped_epoch = 0
        self.best_score = math.inf if mode == "min" else -math.inf
        self.stopping_reason = ""
        self._warned = False

    @property
    def state_key(self) -> str:
        return f"EarlyStopping{{monitor={self.monitor!r}, mode={self.mode!r}}}"

    def state_dict(self):
        return {"wait_count": self.wait_count, "stopped_epoch": self.stopped_epoch,
                "best_score": self.best_score, "patience": self.patience}

    def load_state_dict(self, state_dict):
        self.wait_count = state_dict["wait_count"]
        self.stopped_epoch = state_dict["stopped_epoch"]
        self.best_score = state_dict["best_score"]

    def _improved(self, value: float) -> bool:
        if self.mode == "min":
            return value < self.best_score - self.min_delta
        return value > self.best_score + self.min_delta

    def _at_least(self, value: float, threshold: float) -> bool:
        return value <= threshold if self.mode == "min" else value >= threshold

    def _on_epoch_end(self, trainer) -> bool:
        if self.check_on_train_epoch_end is not None:
            return self.check_on_train_epoch_end
        return not trainer.has_validation or (
            trainer.val_check_interval in (None, 1.0) and trainer.check_val_every_n_epoch == 1)

    def on_validation_end(self, trainer, module):
        if not trainer.sanity_checking and not self._on_epoch_end(trainer):
            self._check(trainer)

    def on_train_epoch_end(self, trainer, module):
        if self._on_epoch_end(trainer):
            self._check(trainer)

    def _check(self, trainer) -> None:
        metrics = trainer.callback_metrics
        if self.monitor not in metrics:
            message = (f"EarlyStopping(monitor={self.monitor!r}) found no such logged value. "
                       + trainer.describe_missing_metric(self.monitor))
            if self.strict:
                raise KeyError(message)
            if not self._warned:
                warnings.warn(message + " Early stopping is skipped.", stacklevel=2)
                self._warned = True
            return
        value = float(metrics[self.monitor])
        reason = ""
        if self.check_finite and not math.isfinite(value):
            reason = f"{self.monitor} = {value} is not finite"
        elif self.stopping_threshold is not None and self._at_least(value, self.stopping_threshold):
            reason = f"{self.monitor} = {value} reached the stopping threshold {self.stopping_threshold}"
        elif self.divergence_threshold is not None and not self._at_least(value, self.divergence_threshold):
            reason = f"{self.monitor} = {value} passed the divergence threshold {self.divergence_threshold}"
        elif self._improved(value):
            self.best_score, self.wait_count = value, 0
        else:
            self.wait_count += 1
            if self.wait_count >= self.patience:
                reason = (f"{self.monitor} did not improve by more than {self.min_delta} in {self.wait_count} "
                          f"checks; best {self.best_score}")
        if reason:
            self.stopping_reason = reason
            self.stopped_epoch = trainer.current_epoch
            trainer.should_stop = True
