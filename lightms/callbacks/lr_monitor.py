"""`LearningRateMonitor`: logs each optimizer's current learning rate."""

from typing import Dict, Optional

import numpy as np

from lightms.callbacks.callback import Callback


def current_learning_rates(optimizer, name: str) -> Dict[str, float]:
    """Reads the learning rate(s) the optimizer's next update will use (a host read).

    Works for `mindspore.nn` optimizers (float, list, Tensor or LearningRateSchedule,
    evaluated at the optimizer's own step counter) and for `mindspore.experimental.optim`
    ones (their param groups' "lr").

    Returns:
        `{name: lr}`, or `{name/pgN: lr}` per parameter group when groups differ.
    """
    if hasattr(optimizer, "param_groups"):
        rates = [float(np.asarray(group["lr"].asnumpy() if hasattr(group["lr"], "asnumpy") else group["lr"]))
                 for group in optimizer.param_groups]
    else:
        lr = optimizer.get_lr()
        lr = lr if isinstance(lr, tuple) else (lr,)
        rates = [float(value.asnumpy()) if hasattr(value, "asnumpy") else float(value) for value in lr]
    if len(rates) == 1:
        return {name: rates[0]}
    return {f"{name}/pg{i}": rate for i, rate in enumerate(rates)}


class LearningRateMonitor(Callback):
    """Logs `lr-<OptimizerClass>` to the loggers (`lr-<OptimizerClass>-1`, ... for more optimizers of one class).

    Args:
        logging_interval: "step" (at the trainer's logging steps, the rate used by that
            optimizer step), "epoch" (at each epoch start), or None (same as "step").

    Raises:
        ValueError: For another interval.
    """

    def __init__(self, logging_interval: Optional[str] = None):
        if logging_interval not in (None, "step", "epoch"):
            raise ValueError(f"LearningRateMonitor(logging_interval=...) must be None, 'step' or 'epoch', "
                             f"got {logging_interval!r}.")
        self.logging_interval = logging_interval or "step"

    def _rates(self, trainer) -> Dict[str, float]:
        rates: Dict[str, float] = {}
        seen: Dict[str, int] = {}
        for optimizer in trainer.optimizers:
            name = f"lr-{type(optimizer).__name__}"
            count = seen[name] = seen.get(name, -1) + 1
            # Several optimizers of one class (manual optimization): lr-Adam, lr-Adam-1, ..., as Lightning names them.
            rates.update(current_learning_rates(optimizer, name if not count else f"{name}-{count}"))
        return rates

    def _log(self, trainer, step: int) -> None:
        rates = self._rates(trainer)
        for logger in trainer.loggers:
            logger.log_metrics(rates, step=step)

    def needs_host_at_step(self, trainer, step: int) -> bool:
        # The rate of step s is read before it runs: a sunk chunk ends after step s - 1.
        return self.logging_interval == "step" and (step + 1) % trainer.log_every_n_steps == 0

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        upcoming = trainer.global_step + 1
        if self.logging_interval == "step" and trainer.state.window == 0 \
                and upcoming % trainer.log_every_n_steps == 0:
            self._log(trainer, upcoming)

    def on_train_epoch_start(self, trainer, module):
        if self.logging_interval == "epoch":
            self._log(trainer, trainer.global_step)
