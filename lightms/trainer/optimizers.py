"""Reads what `configure_optimizers` returned into typed configurations, and steps schedulers.

Learning-rate schedules come in two kinds. A `mindspore.nn.LearningRateSchedule`
(or a list / Tensor of rates) given to a `mindspore.nn` optimizer is evaluated
inside the compiled step at the optimizer's own step counter: nothing to do here.
Host-side schedulers (`mindspore.experimental.optim.lr_scheduler`, including
`ReduceLROnPlateau`) are returned next to the optimizer, Lightning-style, and
stepped by the trainer after optimizer steps or epochs.
"""

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

import warnings

from lightms._mindspore import mindspore as ms
from mindspore import Parameter, Tensor, nn

INTERVALS = ("step", "epoch")


def _optimizer_types():
    types = [nn.Optimizer]
    try:
        from mindspore.experimental.optim import Optimizer as ExperimentalOptimizer

        types.append(ExperimentalOptimizer)
    except ImportError:  # pragma: no cover - other MindSpore versions
        pass
    return tuple(types)


def is_plateau(scheduler) -> bool:
    """Whether `scheduler.step` takes a metric value (ReduceLROnPlateau and look-alikes)."""
    return type(scheduler).__name__ == "ReduceLROnPlateau"


@dataclass
class SchedulerConfig:
    """One host-side learning-rate scheduler and when to step it (Lightning's lr_scheduler config).

    Attributes:
        scheduler: An object with `step()` (or `step(metric)` for plateau schedulers).
        interval: "step" (after optimizer steps) or "epoch" (after epochs).
        frequency: Step it every this many optimizer steps or epochs.
        monitor: Metric name passed to a plateau scheduler.
        strict: Raise if `monitor` is missing (else skip the step with a warning).
    """

    scheduler: Any
    interval: str = "epoch"
    frequency: int = 1
    monitor: Optional[str] = None
    strict: bool = True

    def state_parameters(self) -> Dict[str, Parameter]:
        """The scheduler's own state by attribute name (its step count, a plateau scheduler's best value...)."""
        return {name: value for name, value in vars(self.scheduler).items() if isinstance(value, Parameter)}

    def due(self, count: int) -> bool:
        """Whether the scheduler steps after the `count`-th optimizer step or epoch."""
        return count % self.frequency == 0


@dataclass
class OptimizerConfig:
    """The optimizers of a run, in the order `configure_optimizers` returned them, and their host-side
    learning-rate schedulers."""

    optimizers: List[Any]
    schedulers: List[SchedulerConfig] = field(default_factory=list)

    @property
    def optimizer(self):
        """The first (in automatic optimization, the only) optimizer."""
        return self.optimizers[0]


def _scheduler_config(item, where: str, monitor: Optional[str]) -> SchedulerConfig:
    if isinstance(item, dict):
        unknown = sorted(set(item) - {"scheduler", "interval", "frequency", "monitor", "strict", "name"})
        if "scheduler" not in item:
            raise TypeError(f"{where}: an lr_scheduler dict needs the key 'scheduler' (keys: {sorted(item)}).")
        if unknown:
            raise ValueError(f"{where}: unknown lr_scheduler keys {unknown}.")
        config = SchedulerConfig(item["scheduler"], item.get("interval", "epoch"), item.get("frequency", 1),
                                 item.get("monitor", monitor), item.get("strict", True))
    else:
        config = SchedulerConfig(item, monitor=monitor)
    if not callable(getattr(config.scheduler, "step", None)):
        raise TypeError(f"{where}: {type(config.scheduler).__name__} is not a learning-rate scheduler (no step()). "
                        "In-graph schedules (nn.LearningRateSchedule) go into the optimizer's learning_rate.")
    if config.interval not in INTERVALS:
        raise ValueError(f"{where}: lr_scheduler interval must be 'step' or 'epoch', got {config.interval!r}.")
    if isinstance(config.frequency, bool) or not isinstance(config.frequency, int) or config.frequency < 1:
        raise ValueError(f"{where}: lr_scheduler frequency must be an int >= 1, got {config.frequency!r}.")
    if is_plateau(config.scheduler) and not config.monitor:
        raise ValueError(f"{where}: {type(config.scheduler).__name__} needs a 'monitor' (the metric to watch), "
                         "e.g. {'scheduler': s, 'monitor': 'val_loss'}.")
    return config


def _check_optimizer(value, where: str):
    if value is None:
        raise TypeError(f"{where} returned None; return a mindspore.nn.Optimizer such as "
                        "nn.Adam(self.trainable_params()).")
    if not isinstance(value, _optimizer_types()):
        raise TypeError(f"{where} returned a {type(value).__name__}, which is not a mindspore optimizer "
                        "(mindspore.nn.Optimizer or mindspore.experimental.optim.Optimizer).")
    return value


def _read_dict(item: dict, where: str):
    unknown = sorted(set(item) - {"optimizer", "lr_scheduler", "monitor"})
    if "optimizer" not in item:
        raise TypeError(f"{where} returned a dict without the key 'optimizer': keys {sorted(item)}.")
    if unknown:
        raise ValueError(f"{where} returned unknown keys {unknown}.")
    schedulers = item.get("lr_scheduler")
    schedulers = [] if schedulers is None else [schedulers]
    return [item["optimizer"]], [_scheduler_config(s, where, item.get("monitor")) for s in schedulers]


def read_optimizer_config(returned, module_name: str, automatic: bool = True) -> OptimizerConfig:
    """Checks the return value of `configure_optimizers`.

    Accepted, as in Lightning: an optimizer; a list or tuple of optimizers;
    `([optimizers], [schedulers])`; `{"optimizer": opt, "lr_scheduler": scheduler or
    config dict, "monitor": name}`, or a list or tuple of such dicts. A scheduler config
    dict has "scheduler", and optionally "interval", "frequency", "monitor", "strict".

    Args:
        returned: What configure_optimizers returned.
        module_name: The module's class name, for messages.
        automatic: Automatic optimization, which trains with exactly one optimizer.

    Raises:
        TypeError: If no optimizer (or no scheduler) can be read from `returned`.
        ValueError: If several optimizers come in automatic optimization, one optimizer
            comes twice, or scheduler options are bad.
    """
    where = f"{module_name}.configure_optimizers()"
    if isinstance(returned, dict):
        optimizers, schedulers = _read_dict(returned, where)
    elif isinstance(returned, (list, tuple)) and returned and all(isinstance(r, dict) for r in returned):
        optimizers, schedulers = [], []
        for item in returned:
            more, their = _read_dict(item, where)
            optimizers += more
            schedulers += their
    elif isinstance(returned, (list, tuple)) and len(returned) == 2 and all(isinstance(r, (list, tuple))
                                                                             for r in returned):
        optimizers = list(returned[0])
        schedulers = [_scheduler_config(item, where, None) for item in returned[1]]
    elif isinstance(returned, (list, tuple)):
        optimizers, schedulers = list(returned), []
    else:
        optimizers, schedulers = [returned], []
    if not optimizers:
        raise TypeError(f"{where} returned no optimizer; return a mindspore.nn.Optimizer such as "
                        "nn.Adam(self.trainable_params()).")
    optimizers = [_check_optimizer(value, where) for value in optimizers]
    if len({id(o) for o in optimizers}) != len(optimizers):
        raise ValueError(f"{where} returned the same optimizer twice; return each optimizer once.")
    if automatic and len(optimizers) > 1:
        raise ValueError(f"{where} returned {len(optimizers)} optimizers, but automatic optimization trains with "
                         f"one. To step several, set `self.automatic_optimization = False` in "
                         f"{module_name}.__init__ and step them in training_step: `opt_a, opt_b = self.optimizers()`, "
                         "`loss, grads = self.value_and_grad(fn, opt_a)(...)`, `self.optimizer_step(opt_a, grads)`.")
    return OptimizerConfig(optimizers, schedulers)


def name_optimizer_states(optimizers, module) -> None:
    """Renames optimizer state Parameters whose names another optimizer of the run already uses.

    Every MindSpore optimizer names its step counter `global_step` (and `learning_rate`,
    `beta1_power`, ...); one graph cannot hold two Parameters of one name, and a
    checkpoint could not tell them apart. The second optimizer's `global_step` becomes
    `optimizer1.global_step`, and so on, by its position in `configure_optimizers`.
    The module's weights are never renamed.
    """
    weights = {id(p) for p in module.get_parameters()}
    seen = {p.name for p in module.get_parameters()}
    for index, optimizer in enumerate(optimizers):
        own = [p for p in optimizer.get_parameters() if id(p) not in weights]
        for group in getattr(optimizer, "param_groups", []):
            own += [v for v in group.values() if isinstance(v, Parameter) and id(v) not in weights
                    and all(v is not q for q in own)]
        for param in own:
            if param.name in seen and not param.name.startswith(f"optimizer{index}."):
                param.name = f"optimizer{index}.{param.name}"
        seen.update(p.name for p in own)


def step_schedulers(schedulers: List[SchedulerConfig], interval: str, count: int,
                    metrics: Callable[[], Dict[str, float]], plateau: bool = True) -> None:
    """Steps the host-side schedulers of `interval` that are due after `count` optimizer steps or epochs.

    Args:
        schedulers: The run's scheduler configurations.
        interval: "step" or "epoch".
        count: Optimizer steps (or epochs) done so far.
        metrics: Returns `trainer.callback_metrics` (read only for plateau schedulers: a host sync).
        plateau: Step plateau schedulers too (False: leave them, with a warning).

    Raises:
        KeyError: If a strict plateau scheduler's monitor is not logged.
    """
    for config in schedulers:
        if config.interval != interval or not config.due(count):
            continue
        if not is_plateau(config.scheduler):
            config.scheduler.step()
            continue
        if not plateau:
            warnings.warn(f"{type(config.scheduler).__name__} was not stepped for the epoch before the resume: the "
                          f"checkpoint was written before it, and the value it monitors ({config.monitor!r}) is not "
                          "in the checkpoint.", stacklevel=3)
            continue
        available = metrics()
        value = available.get(config.monitor)
        if value is None:
            message = (f"{type(config.scheduler).__name__} monitors {config.monitor!r}, which is not logged; "
                       f"available: {sorted(available)}")
            if config.strict:
                raise KeyError(message)
            warnings.warn(message + "; the scheduler was not stepped.", stacklevel=2)
            continue
        config.scheduler.step(Tensor(value, ms.float32))
