"""What `self.log` writes to: option records, a dry-run recorder, and the host's logs.

A compiled step logs into device buffers (`device_logs.DeviceLogBuffers`) whose names
and slots are fixed before compilation by a dry run of the hook (`LogRecorder`); hooks
that run on the host log into `HostLogs`.
"""

from dataclasses import dataclass
from typing import Dict, List, Optional

import numpy as np

REDUCE_FXS = ("mean", "sum", "max", "min")
INITIAL = {"mean": 0.0, "sum": 0.0, "max": -np.inf, "min": np.inf}  # each reduction before any value


@dataclass(frozen=True)
class LogOptions:
    """The options one `self.log` call was made with, after defaults.

    Attributes:
        name: The metric name as the user wrote it.
        prog_bar: Show the value on the progress bar.
        logger: Send the value to the loggers.
        on_step: Report the value of every optimizer step.
        on_epoch: Report the reduced value over the epoch.
        reduce_fx: One of "mean", "sum", "max", "min".
        batch_size: Weight of each value in the mean; None means the size of the
            batch the step received.
        sync_dist: Reduce the step and epoch values over the data-parallel workers (with `reduce_fx`).
    """

    name: str
    prog_bar: bool
    logger: bool
    on_step: bool
    on_epoch: bool
    reduce_fx: str
    batch_size: Optional[int]
    sync_dist: bool = False

    def reported_names(self) -> Dict[str, str]:
        """Maps "step"/"epoch" to the name each value is reported under.

        Lightning's naming: with both on_step and on_epoch, the values are
        `name_step` and `name_epoch`; with one of them, just `name`.
        """
        if self.on_step and self.on_epoch:
            return {"step": f"{self.name}_step", "epoch": f"{self.name}_epoch"}
        if self.on_step:
            return {"step": self.name}
        if self.on_epoch:
            return {"epoch": self.name}
        return {}


# Hooks whose `self.log` calls report per optimizer step by default (Lightning's defaults).
STEP_LEVEL_HOOKS = frozenset({"training_step", "on_train_batch_start", "on_train_batch_end"})


def resolve_log_options(
    hook: str,
    name: str,
    prog_bar: bool,
    logger: bool,
    on_step: Optional[bool],
    on_epoch: Optional[bool],
    reduce_fx: str,
    batch_size: Optional[int],
    sync_dist: bool = False,
) -> LogOptions:
    """Checks the arguments of one `self.log` call and fills in Lightning's per-hook defaults.

    Args:
        hook: The hook the call was made from.
        name, prog_bar, logger, on_step, on_epoch, reduce_fx, batch_size: As given to `log`.

    Returns:
        The complete options.

    Raises:
        TypeError: If `name` is not a string or `batch_size` is not an int.
        ValueError: If `reduce_fx` is unknown, both on_step and on_epoch are False,
            or `batch_size` is not positive.
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"self.log in {hook}: the name must be a non-empty string, got {name!r}.")
    if reduce_fx not in REDUCE_FXS:
        raise ValueError(f"self.log({name!r}) in {hook}: reduce_fx must be one of {REDUCE_FXS}, got {reduce_fx!r}.")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int)):
        raise TypeError(f"self.log({name!r}) in {hook}: batch_size must be an int, got {batch_size!r}.")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"self.log({name!r}) in {hook}: batch_size must be >= 1, got {batch_size}.")
    step_level = hook in STEP_LEVEL_HOOKS
    on_step = step_level if on_step is None else bool(on_step)
    on_epoch = (not step_level) if on_epoch is None else bool(on_epoch)
    if not on_step and not on_epoch:
        raise ValueError(f"self.log({name!r}) in {hook}: on_step and on_epoch are both False, so nothing is logged.")
    return LogOptions(name, bool(prog_bar), bool(logger), on_step, on_epoch, reduce_fx, batch_size, bool(sync_dist))


def scalar_size(value) -> Optional[int]:
    """Returns the number of elements of a Tensor, array or number, or None if unknown."""
    if isinstance(value, (bool, int, float, np.floating, np.integer)):
        return 1
    size = getattr(value, "size", None)
    return int(size) if size is not None else None


class LogRecorder:
    """Collects the `self.log` calls of one hook during its eager dry run.

    Args:
        hook: The hook being recorded, for error messages ("training_step").
    """

    def __init__(self, hook: str):
        self.hook = hook
        self.options: Dict[str, LogOptions] = {}

    def log(self, hook, name, value, prog_bar, logger, on_step, on_epoch, reduce_fx, batch_size, sync_dist=False):
        """`LightningCell.log` during the dry run: checks and records the call."""
        self.record(resolve_log_options(hook, name, prog_bar, logger, on_step, on_epoch, reduce_fx, batch_size,
                                        sync_dist), value)
        return value

    def record(self, options: LogOptions, value) -> None:
        """Checks one logged value and remembers its options.

        Raises:
            ValueError: If the value is not a single number, or the same name is
                logged twice with different options.
            TypeError: If the value is not a number or Tensor.
        """
        size = scalar_size(value)
        if size is None:
            raise TypeError(
                f"self.log({options.name!r}, ...) in {self.hook}: expected a scalar Tensor or a "
                f"number, got {type(value).__name__}."
            )
        if size != 1:
            shape = tuple(getattr(value, "shape", ()))
            raise ValueError(
                f"self.log({options.name!r}, ...) in {self.hook}: expected a single value, got a "
                f"tensor of shape {shape}. Reduce it first (for example with .mean())."
            )
        known = self.options.get(options.name)
        if known is not None and known != options:
            raise ValueError(
                f"self.log({options.name!r}, ...) is called twice in {self.hook} with different "
                f"options: {known} and {options}."
            )
        self.options[options.name] = options


def is_metric(value) -> bool:
    """Whether `value` is a `mindspore.train.Metric` (clear / update / eval)."""
    from mindspore.train import Metric

    return isinstance(value, Metric)


class HostLogs:
    """Where `self.log` writes when the hook runs on the host.

    That is every `on_*` hook, and the evaluation steps of a module that holds
    `mindspore.train.Metric`s. Values are read to Python floats at once and reduced
    like the device buffers; a logged Metric is evaluated (then cleared) at epoch end.

    With several data-parallel workers, a value logged with `sync_dist=True` is reduced over them
    as it is logged (every worker must log it at the same point): its step value and what it adds
    to the epoch are the workers' together.

    Args:
        world_size: Data-parallel workers.

    Attributes:
        current_batch_size: Weight of the values logged by the step running now.
    """

    def __init__(self, world_size: int = 1):
        self.world_size = world_size
        self.options: Dict[str, LogOptions] = {}
        self._step: Dict[str, float] = {}
        self._epoch: Dict[str, List[float]] = {}  # name -> [reduced value, weight]
        self._metrics: Dict[str, object] = {}  # logged Metrics not yet evaluated
        self._evaluated: Dict[str, float] = {}  # logged Metrics' values, once evaluated this epoch
        self.current_batch_size = 1

    def log(self, hook, name, value, prog_bar, logger, on_step, on_epoch, reduce_fx, batch_size, sync_dist=False):
        """`LightningCell.log` from a host hook."""
        if is_metric(value):
            # Lightning logs a metric object's compute() at epoch end; here, its eval().
            self.options[name] = resolve_log_options(hook, name, prog_bar, logger, False, True, "mean", None)
            self._metrics[name] = value
            return value
        options = resolve_log_options(hook, name, prog_bar, logger, on_step, on_epoch, reduce_fx, batch_size,
                                      sync_dist)
        LogRecorder(hook).record(options, value)  # same checks as inside steps
        number = float(value.asnumpy()) if hasattr(value, "asnumpy") else float(value)
        self.options[name] = options
        weight = float(batch_size or self.current_batch_size) if reduce_fx == "mean" else 1.0
        if options.sync_dist and self.world_size > 1:
            from lightms.distributed.reduction import reduce_logged

            values, weights = reduce_logged([number * weight if reduce_fx == "mean" else number], [weight],
                                            [reduce_fx])
            weight = float(weights[0])
            number = float(values[0]) / weight if reduce_fx == "mean" else float(values[0])
        self._step[name] = number
        acc = self._epoch.setdefault(name, [INITIAL[reduce_fx], 0.0])
        if reduce_fx == "mean":
            acc[0] += number * weight
        elif reduce_fx == "sum":
            acc[0] += number
        elif reduce_fx == "max":
            acc[0] = max(acc[0], number)
        else:
            acc[0] = min(acc[0], number)
        acc[1] += weight
        return value

    def read_step(self) -> Dict[str, float]:
        """Returns the values logged since the last call and forgets them."""
        out, self._step = self._step, {}
        return out

    def read_epoch(self) -> Dict[str, float]:
        """Returns the epoch reduction of every name logged this epoch, and the value of each logged Metric.

        A Metric is evaluated (then cleared) the first time it is read after being logged; reading
        again returns the same values, plus what was logged since.
        """
        for name, metric in self._metrics.items():
            self._evaluated[name] = float(np.asarray(metric.eval()))
            metric.clear()
        self._metrics = {}
        values = {
            name: acc[0] / acc[1] if self.options[name].reduce_fx == "mean" else acc[0]
            for name, acc in self._epoch.items()
        }
        values.update(self._evaluated)
        return values

    def reset(self) -> None:
        """Forgets everything (start of an epoch)."""
        self._step, self._epoch, self._metrics, self._evaluated = {}, {}, {}, {}
