"""Builds the steps of a run from a module: dry run, log buffers, gradient pipeline, graphs."""

import warnings
from typing import Optional, Tuple

from lightms._mindspore import mindspore as ms
from lightms.module.cell import LightningCell
from lightms.module.logging import DeviceLogBuffers, HostLogs, is_metric
from lightms.step.binding import explain_graph_failure, logs_unconditionally
from lightms.step.dry_run import check_training_output, dry_run
from lightms.step.eval_step import EvalStep
from lightms.step.graph import batch_passing
from lightms.step.gradients import ClipGradNorm, ClipGradValue, GradientPipeline
from lightms.step.train_step import LoopCounters, TrainStep


def gradient_pipeline(clip_val: Optional[float], clip_algorithm: str) -> GradientPipeline:
    """The gradient transforms between the averaged gradients and the optimizer."""
    stages = []
    if clip_val:
        stages.append(ClipGradNorm(clip_val) if clip_algorithm == "norm" else ClipGradValue(clip_val))
    return GradientPipeline(stages)


def build_train_step(module, batch, optimizer, counters: LoopCounters, logs: Optional[DeviceLogBuffers],
                     accumulate: int, transforms: GradientPipeline, compile: bool, sink_length: int = 1,
                     loss_scaler=None, autocast=None, step_history: bool = True) -> Tuple[TrainStep, DeviceLogBuffers]:
    """Dry-runs training_step on `batch`, then builds its graphs.

    Args:
        logs: Buffers restored from a checkpoint, kept if the dry run logs the same names.
        sink_length: Micro-batches per sunk host call (1: no sink graph).
        loss_scaler: A `mindspore.amp` loss scaler, or None.
        autocast: Wraps the forward for mixed precision (`Precision.autocast`), or None.
        step_history: Keep each sunk step's logged values for the loggers.

    Returns:
        The step and the log buffers it writes.
    """
    recorder, output = dry_run(module, "training_step", batch.data, batch.index)
    check_training_output(output, f"{type(module).__name__}.training_step")
    options = list(recorder.options.values())
    if logs is None or logs.options != options:
        logs = DeviceLogBuffers(options)
    # Each name once per step: the dry run saw each once, and no self.log sits under a condition.
    logs.logged_once = recorder.logged_once and logs_unconditionally(module, LightningCell)
    step = TrainStep(module, optimizer, logs, counters, accumulate, transforms, compile, loss_scaler,
                     sink_length if sink_length > 1 else 0, autocast, step_history,
                     passing=batch_passing(batch.data, compile),
                     explain_failure=_failure_explainer(module, "training_step"))
    return step, logs


def _failure_explainer(module, hook: str):
    """What a new step graph of `hook` calls when it fails (`binding.explain_graph_failure`)."""
    return lambda error: explain_graph_failure(module, LightningCell, hook, error)


def module_metrics(module) -> list:
    """The `mindspore.train.Metric`s held as attributes of `module`."""
    return [value for value in vars(module).values() if is_metric(value)]


def build_eval_step(module, stage: str, hook: str, batch, host_logs: HostLogs, compile: bool, autocast=None):
    """Builds the step of validation_step, test_step or predict_step.

    A module holding `mindspore.train.Metric`s runs validation/test hooks on the host
    (`Metric.update` is host code), with only its forward (`construct`) compiled.

    Returns:
        (the step, where `self.log` writes, the device buffers or None).
    """
    if module_metrics(module) and stage != "predict":
        if compile and "_lightms_construct_before" not in module.__dict__:
            # The instance may already hold a construct (mixed precision decorates it): compile that one,
            # and let the trainer put it back after the run.
            object.__setattr__(module, "_lightms_construct_before", module.__dict__.get("construct"))
            object.__setattr__(module, "construct", ms.jit(module.construct, jit_level="O1"))
        step = EvalStep(getattr(module, hook), None, False, autocast, batch_passing(batch.data, False))
        return step, host_logs, None
    recorder, _ = dry_run(module, hook, batch.data, batch.index)
    logs = DeviceLogBuffers(list(recorder.options.values()))
    for options in logs.options:
        if options.on_step and stage != "predict":
            warnings.warn(f"self.log({options.name!r}, on_step=True) in {hook}: lightms reports {stage} values "
                          "per epoch; the step value is not sent to the loggers.", stacklevel=3)
    step = EvalStep(getattr(module, hook), logs, compile, autocast, batch_passing(batch.data, compile),
                    _failure_explainer(module, hook))
    return step, logs, logs


__all__ = ["build_eval_step", "build_train_step", "gradient_pipeline", "module_metrics"]
