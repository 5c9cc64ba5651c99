"""`DDPStrategy`: data-parallel training's options, as Lightning's `Trainer(strategy=DDPStrategy(...))`."""

import datetime
from dataclasses import dataclass
from typing import Union


@dataclass(frozen=True)
class DDPStrategy:
    """Data-parallel training on msrun (`Trainer(strategy="ddp")` is `DDPStrategy()`).

    Args:
        timeout: How long a worker may wait for the others (seconds or a `datetime.timedelta`):
            MindSpore's collectives give up after it, and a worker that made no progress for that
            long decides a worker has died or hangs and ends (`distributed.watchdog`). 30 minutes
            by default, PyTorch's default process-group timeout. Each chunk of steps (the first
            with its compilation), each validation and each checkpoint must fit in it.

    Raises:
        ValueError: For a timeout that is not positive.
    """

    timeout: Union[float, datetime.timedelta] = 1800.0

    def __post_init__(self):
        seconds = self.timeout.total_seconds() if isinstance(self.timeout, datetime.timedelta) else self.timeout
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not seconds > 0:
            raise ValueError(f"DDPStrategy(timeout={self.timeout!r}): the timeout must be a positive number of "
                             "seconds or a datetime.timedelta.")
        object.__setattr__(self, "timeout", float(seconds))


__all__ = ["DDPStrategy"]
