"""`Timer`: stop fit after a wall-clock duration (also `Trainer(max_time=...)`)."""

import time
from datetime import timedelta
from typing import Dict, Union

from lightms.callbacks.callback import Callback


def parse_duration(duration: Union[str, timedelta, Dict[str, int]]) -> float:
    """Returns seconds from "DD:HH:MM:SS", a timedelta, or a dict of timedelta keywords.

    Raises:
        ValueError: For a malformed string.
        TypeError: For another type.
    """
    if isinstance(duration, timedelta):
        return duration.total_seconds()
    if isinstance(duration, dict):
        return timedelta(**duration).total_seconds()
    if isinstance(duration, str):
        parts = duration.split(":")
        if len(parts) != 4 or not all(p.strip().isdigit() for p in parts):
            raise ValueError(f"A duration string must look like 'DD:HH:MM:SS', got {duration!r}.")
        days, hours, minutes, seconds = (int(p) for p in parts)
        return timedelta(days=days, hours=hours, minutes=minutes, seconds=seconds).total_seconds()
    raise TypeError(f"A duration must be 'DD:HH:MM:SS', a timedelta or a dict, got {type(duration).__name__}.")


class Timer(Callback):
    """Sets `trainer.should_stop` once training has run for `duration`.

    Fit then ends after the current optimizer step (a window is never cut).
    The elapsed time is saved in checkpoints and counts on after a resume.

    Args:
        duration: "DD:HH:MM:SS", a timedelta, or a dict such as {"minutes": 30}.
        interval: Check after every "step" or at each "epoch" end.
    """

    def __init__(self, duration, interval: str = "step"):
        if interval not in ("step", "epoch"):
            raise ValueError(f"Timer(interval=...) must be 'step' or 'epoch', got {interval!r}.")
        self.duration = parse_duration(duration)
        self.interval = interval
        self._offset = 0.0  # time spent before a resume
        self._start = None

    def time_elapsed(self) -> float:
        """Seconds of training so far."""
        return self._offset + (time.monotonic() - self._start if self._start is not None else 0.0)

    def state_dict(self):
        return {"time_elapsed": self.time_elapsed()}

    def load_state_dict(self, state_dict):
        self._offset = float(state_dict.get("time_elapsed", 0.0))

    def on_train_start(self, trainer, module):
        self._start = time.monotonic()

    def on_train_end(self, trainer, module):
        self._offset, self._start = self.time_elapsed(), None

    def _check(self, trainer):
        if self.time_elapsed() >= self.duration:
            trainer.should_stop = True

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if self.interval == "step":
            self._check(trainer)

    def on_train_epoch_end(self, trainer, module):
        self._check(trainer)
