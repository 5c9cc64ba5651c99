"""`StepPlan`: everything that shapes the compiled training step, decided once, before compiling.

The plan is built from the Trainer's settings and one eager run of `training_step`
on the first batch (the dry run, which records the names it logs and the keys it
returns). `TrainEngine` builds its graphs from the plan and nothing reconfigures
them afterwards; `print(plan)` shows what the device program does.
"""

import dataclasses
from dataclasses import dataclass
from typing import Optional, Tuple

from lightms._mindspore import mindspore as ms  # noqa: F401  (quiets MindSpore's logs before it loads)
from mindspore import Tensor

from lightms.checkpoint.io import optimizer_state
from lightms.engine.dry_run import check_training_output, dry_run
from lightms.module.logging import LogOptions


@dataclass(frozen=True)
class StepPlan:
    """What the training graphs compute.

    Attributes:
        accumulate: Micro-batches averaged into one optimizer step.
        sink_length: Micro-batches per sunk graph call (1: no sunk graph).
        clip_val: Gradient clipping threshold, or None.
        clip_algorithm: "norm" (global L2 norm) or "value".
        loss_scaling: Dynamic loss scaling (overflowing steps are skipped on the device).
        precision: The Trainer's precision (its autocast wraps training_step).
        logs: The names training_step logs, with their options, in slot order.
        step_history: Keep every sunk optimizer step's logged values (a logger listens).
        frozen: Names of the optimizer's parameters with `requires_grad=False` when planned:
            not differentiated, and left as they are by the update.
        outputs: Keys of training_step's returned dict besides "loss" (handed to
            `on_train_batch_end`), with each value's shape and dtype.
        compile: Compiled whole graphs (True) or eager steps (False).
        manual: Manual optimization: training_step computes and applies its own gradients
            (`self.value_and_grad`, `self.optimizer_step`); the graphs run it as it is.
        returns_loss: Whether training_step returns a loss (under manual optimization it may
            return None).
        privacy: DP-SGD's (max_grad_norm, noise standard deviation, noise seed), or None.
        world_size: Data-parallel workers: with more than one, each optimizer step's gradients are
            averaged over them first (one AllReduce per gradient).
    """

    accumulate: int
    sink_length: int
    clip_val: Optional[float]
    clip_algorithm: str
    loss_scaling: bool
    precision: str
    logs: Tuple[LogOptions, ...]
    step_history: bool
    frozen: Tuple[str, ...]
    outputs: Tuple[Tuple[str, Tuple[int, ...], object], ...]
    compile: bool
    manual: bool = False
    returns_loss: bool = True
    privacy: Optional[Tuple[float, float, int]] = None
    world_size: int = 1

    @property
    def stages(self) -> Tuple[str, ...]:
        """The gradient stages between the averaged gradients and the optimizer, in order."""
        if self.manual:
            return ("training_step's own value_and_grad and optimizer_step calls",)
        stages = (f"mean over {self.world_size} workers",) if self.world_size > 1 else ()
        stages += ("unscale", "skip if not finite") if self.loss_scaling else ()
        if self.privacy:
            norm, std, _ = self.privacy
            stages += (f"clip each example to norm {norm:g}, sum", f"add N(0, {std:g}^2) noise",
                       "divide by the window's examples")
        if self.clip_val:
            stages += (f"clip by {self.clip_algorithm} {self.clip_val:g}",)
        if self.frozen:
            stages += (f"keep {len(self.frozen)} frozen parameter(s)",)
        return stages + ("optimizer update",)

    @property
    def output_keys(self) -> Tuple[str, ...]:
        return tuple(key for key, _, _ in self.outputs)

    def with_frozen(self, frozen: Tuple[str, ...]) -> "StepPlan":
        """The same plan with another set of frozen parameters."""
        return dataclasses.replace(self, frozen=tuple(frozen))

    def __str__(self) -> str:
        lines = [f"StepPlan: {'manual optimization, ' if self.manual else ''}"
                 f"{self.accumulate} micro-batch(es) per optimizer step, "
                 f"{self.sink_length} per host call, {'compiled' if self.compile else 'eager'}, "
                 f"precision {self.precision}",
                 "  gradients: " + " -> ".join(self.stages),
                 "  logged: " + (", ".join(f"{o.name} ({o.reduce_fx}, "
                                           f"{'step' if o.on_step else ''}{'+' if o.on_step and o.on_epoch else ''}"
                                           f"{'epoch' if o.on_epoch else ''})" for o in self.logs) or "nothing")
                 + (", each sunk step kept" if self.step_history and self.sink_length > 1 else "")]
        if self.outputs:
            lines.append("  outputs besides loss: " + ", ".join(self.output_keys))
        return "\n".join(lines)


def plan_training(module, batch, optimizers, *, accumulate: int, sink_length: int, clip_val: Optional[float],
                  clip_algorithm: str, precision, step_history: bool, compile: bool, privacy=None,
                  world_size: int = 1) -> StepPlan:
    """Runs training_step once eagerly on `batch` (the dry run) and plans the step.

    Under manual optimization (`module.automatic_optimization` False) the dry run's
    updates are undone: the weights and the optimizers' state are put back.

    Args:
        module: The LightningCell.
        batch: The first Batch.
        optimizers: The run's optimizers (one in automatic optimization).
        accumulate, sink_length, clip_val, clip_algorithm: The Trainer's settings.
        precision: The run's `Precision`.
        step_history: Whether a logger listens (sunk steps then keep each step's values).
        compile: Whether steps are compiled.
        privacy: The run's `lightms.privacy.DPSGD`, or None.
        world_size: Data-parallel workers.

    Raises:
        ValueError, TypeError: For a bad training_step return value, or a bad `self.log` call,
            naming the hook.
    """
    where = f"{type(module).__name__}.training_step"
    manual = not module.automatic_optimization
    restore = ()
    if manual:
        names = {p.name for p in module.get_parameters()}
        restore = list(module.get_parameters()) + [p for optimizer in optimizers
                                                   for p in optimizer_state(optimizer, names)]
    recorder, output = dry_run(module, "training_step", batch.data, batch.index, restore)
    check_training_output(output, where, manual)
    outputs = ()
    if isinstance(output, dict):
        extra = [(key, value) for key, value in output.items() if key != "loss"]
        for key, value in extra:
            if not isinstance(key, str) or not isinstance(value, Tensor):
                raise TypeError(f"{where} returned a dict whose entry {key!r} is a {type(value).__name__}; besides "
                                "'loss', a compiled step can return Tensors under string keys.")
        outputs = tuple((key, tuple(value.shape), value.dtype) for key, value in extra)
    return StepPlan(
        accumulate=accumulate, sink_length=sink_length, clip_val=clip_val, clip_algorithm=clip_algorithm,
        loss_scaling=precision.loss_scaling, precision=precision.name, logs=tuple(recorder.options.values()),
        step_history=step_history, frozen=() if manual else frozen_parameters(optimizers[0]), outputs=outputs,
        compile=compile, manual=manual, returns_loss=output is not None,
        privacy=None if privacy is None else (privacy.max_grad_norm, privacy.noise_multiplier * privacy.max_grad_norm,
                                              privacy.seed),
        world_size=world_size)


def frozen_parameters(optimizer) -> Tuple[str, ...]:
    """Names of the optimizer's parameters whose `requires_grad` is False now."""
    return tuple(p.name for p in optimizer.parameters if not p.requires_grad)


__all__ = ["StepPlan", "frozen_parameters", "plan_training"]
