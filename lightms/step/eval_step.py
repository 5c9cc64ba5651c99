"""The compiled evaluation step: one call of validation_step, test_step or predict_step."""

from typing import Callable, Optional

from lightms.step.graph import BatchPassing, compile_function


class EvalStep:
    """Runs one evaluation hook as a graph (no gradients, no update).

    Args:
        hook: The module's bound hook, e.g. `module.validation_step`.
        logs: The device log buffers for this hook, or None when the hook runs on the host.
        compile: Run as a compiled whole graph (True) or eagerly (False).
        autocast: Wraps the hook for mixed precision (`Precision.autocast`), or None.
        passing: How the step gets its batch (`graph.batch_passing`).
        explain_failure: Turns a new graph's failure into a clearer error, or None (`graph.GraphFunction`).

    Attributes:
        compiled: Whether the step runs as a graph (its batch_idx is then a Tensor).
    """

    def __init__(self, hook, logs, compile: bool, autocast: Optional[Callable], passing: BatchPassing,
                 explain_failure: Optional[Callable] = None):
        run_hook = hook if autocast is None else autocast(hook)
        self._pack = passing.pack
        unpack = passing.unpack

        def step(batch_idx, *inputs):
            batch = unpack(*inputs)
            if logs is None:  # a host-run hook (it updates Metrics): HostLogs weighs its own values
                return run_hook(batch, batch_idx)
            output = run_hook(batch, batch_idx)
            logs.close_window()
            return output

        self.compiled = compile
        self._step = compile_function(step, compile, explain_failure)

    def __call__(self, batch, batch_idx):
        """Returns what the hook returned for this batch."""
        return self._step(batch_idx, *self._pack(batch))
