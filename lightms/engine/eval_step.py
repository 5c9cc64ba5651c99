"""The compiled evaluation step: one call of validation_step, test_step or predict_step."""

import warnings
from typing import Callable, Optional

from lightms._mindspore import mindspore as ms
from lightms.engine.dry_run import dry_run
from lightms.engine.engine import compile_function
from lightms.trainer.chunks import batch_passing
from lightms.module.device_logs import DeviceLogBuffers
from lightms.module.logging import HostLogs, is_metric


def module_metrics(module) -> list:
    """The `mindspore.train.Metric`s held as attributes of `module`."""
    return [value for value in vars(module).values() if is_metric(value)]


class EvalStep:
    """Runs one evaluation hook as a graph (no gradients, no update).

    A module holding `mindspore.train.Metric`s runs its validation/test hook on the host
    (`Metric.update` is host code), with only its forward (`construct`) compiled.

    Args:
        module: The LightningCell (bound: `binding.ModuleBinding`).
        stage: "validation", "test" or "predict".
        hook: Its hook's name ("validation_step").
        batch: The first Batch: the dry run's, and how the graph receives batches.
        host_logs: Where `self.log` writes when the hook runs on the host.
        binding: The run's `ModuleBinding` (its `inside` context, its compiled `construct`).
        compile: Run as a compiled whole graph (True) or eagerly (False).
        autocast: Wraps the hook for mixed precision (`Precision.autocast`), or None.
        explain_failure: Turns a new graph's failure into a clearer error, or None.

    Attributes:
        compiled: Whether the step runs as a graph (its batch_idx is then a Tensor).
        log_target: Where `self.log` writes: the device buffers, or `host_logs`.
        logs: The device buffers, or None when the hook runs on the host.
    """

    def __init__(self, module, stage: str, hook: str, batch, host_logs: HostLogs, binding, compile: bool,
                 autocast: Optional[Callable] = None, explain_failure: Optional[Callable] = None):
        self.hook, self.binding = hook, binding
        on_host = bool(module_metrics(module)) and stage != "predict"
        if on_host:
            if compile:
                binding.compile_construct(lambda construct: ms.jit(construct, jit_level="O1"))
            self.logs, compile = None, False
        else:
            recorder, _ = dry_run(module, hook, batch.data, batch.index)
            self.logs = DeviceLogBuffers(list(recorder.options.values()))
            for options in self.logs.options:
                if options.on_step and stage != "predict":
                    warnings.warn(f"self.log({options.name!r}, on_step=True) in {hook}: lightms reports {stage} values "
                                  "per epoch; the step value is not sent to the loggers.", stacklevel=4)
        self.log_target = host_logs if on_host else self.logs
        hook_fn = getattr(module, hook)
        run_hook = hook_fn if autocast is None else autocast(hook_fn)
        passing = batch_passing(batch.data, compile)
        self._pack, unpack, logs = passing.pack, passing.unpack, self.logs

        def step(batch_idx, *inputs):
            output = run_hook(unpack(*inputs), batch_idx)
            if logs is not None:  # a host-run hook's HostLogs weighs its own values
                logs.close_window()
            return output

        self.compiled = compile
        self._step = compile_function(step, compile, explain_failure)

    def __call__(self, batch):
        """Runs the hook on a Batch; returns what the hook returned."""
        target = self.log_target
        if isinstance(target, HostLogs):
            target.current_batch_size = batch.size
        else:
            target.set_batch_size(batch.size)
        # A compiled step takes an int32 Tensor, so a new index does not recompile it.
        index = ms.Tensor(batch.index, ms.int32) if self.compiled else batch.index
        with self.binding.inside(self.hook, target):
            return self._step(index, *self._pack(batch.data))


__all__ = ["EvalStep", "module_metrics"]
