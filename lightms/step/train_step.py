"""The compiled training step: forward, loss, gradients, accumulation, transforms, update.

Two graphs are built from the same pieces:

* `optimizer_step` closes an accumulation window: it adds this micro-batch's
  gradients to the window, averages over the micro-batches the window holds,
  runs the gradient pipeline (clipping, and later stages), applies the
  optimizer, closes the log window and advances the step counter.
* `window_step` (only when accumulate > 1) adds the micro-batch's gradients to
  device-side accumulators and does nothing else.

The host decides which one to call from its own counters, so no control flow on
device values is needed and no value comes back to the host.
"""

from typing import Callable

import numpy as np

from lightms._mindspore import mindspore as ms
from mindspore import Parameter, ParameterTuple, Tensor, nn, ops

from lightms.step.gradients import GradientPipeline

_hyper_map = ops.HyperMap()


class LoopCounters(nn.Cell):
    """Device copies of the loop counters that compiled steps read live."""

    def __init__(self):
        super().__init__(auto_prefix=False)
        self.global_step = Parameter(Tensor(0, ms.int32), name="lightms.global_step", requires_grad=False)
        self.current_epoch = Parameter(Tensor(0, ms.int32), name="lightms.current_epoch", requires_grad=False)
        # Micro-batches whose loss was NaN or infinite; the host reads it when it syncs anyway.
        self.nonfinite_losses = Parameter(Tensor(0, ms.int32), name="lightms.nonfinite_losses", requires_grad=False)
        self._zero, self._one = Tensor(0, ms.int32), Tensor(1, ms.int32)

    def count_nonfinite(self, loss):
        """Adds 1 to `nonfinite_losses` if `loss` is not finite (graph-parseable)."""
        return ops.assign_add(self.nonfinite_losses, ops.select(ops.isfinite(loss), self._zero, self._one))

    def set(self, current_epoch: int, global_step: int) -> None:
        """Writes the host's counters to the device (no sync; `set_data` would unlink compiled graphs)."""
        ops.assign(self.current_epoch, Tensor(current_epoch, ms.int32))
        ops.assign(self.global_step, Tensor(global_step, ms.int32))


def loss_from_output(output):
    """Picks the loss out of what training_step returned (graph-parseable)."""
    if isinstance(output, dict):
        return output["loss"]
    return output


def compile_function(fn: Callable, compile: bool) -> Callable:
    """Returns `fn` compiled with `mindspore.jit`, or `fn` itself when `compile` is False."""
    return ms.jit(fn, jit_level="O1") if compile else fn


class TrainStep:
    """Builds the training graphs for one module and optimizer.

    Args:
        module: The LightningCell (its methods already made graph-callable).
        optimizer: A MindSpore optimizer over (some of) the module's parameters.
        logs: The device log buffers of training_step.
        counters: The device loop counters.
        accumulate: Micro-batches per optimizer step.
        transforms: Gradient transforms applied to the averaged gradients.
        compile: Compile with `mindspore.jit` (True) or run eagerly (False).
    """

    def __init__(self, module, optimizer, logs, counters: LoopCounters, accumulate: int,
                 transforms: GradientPipeline, compile: bool):
        self.accumulate = accumulate
        weights = optimizer.parameters

        def forward(batch, batch_idx):
            return loss_from_output(module.training_step(batch, batch_idx))

        grad_fn = ms.value_and_grad(forward, None, weights)

        if accumulate > 1:
            self.accumulators = ParameterTuple(
                Parameter(Tensor(np.zeros(p.shape, ms.dtype_to_nptype(p.dtype))), name=f"lightms_accum.{p.name}",
                          requires_grad=False)
                for p in weights
            )
            accumulators = self.accumulators

            def window_step(batch, batch_idx):
                loss, grads = grad_fn(batch, batch_idx)
                loss = ops.depend(loss, counters.count_nonfinite(loss))
                return ops.depend(loss, _hyper_map(ops.assign_add, accumulators, grads))

            def optimizer_step(batch, batch_idx, window_size):
                loss, grads = grad_fn(batch, batch_idx)
                loss = ops.depend(loss, counters.count_nonfinite(loss))
                summed = _hyper_map(ops.add, accumulators, grads)
                grads = _hyper_map(ops.partial(_divide, window_size), summed)
                loss = ops.depend(loss, optimizer(transforms(grads)))
                loss = ops.depend(loss, _hyper_map(ops.assign, accumulators, _hyper_map(ops.zeros_like, accumulators)))
                loss = ops.depend(loss, logs.close_window())
                return ops.depend(loss, ops.assign_add(counters.global_step, Tensor(1, ms.int32)))

            self._window_step = compile_function(window_step, compile)
        else:
            def optimizer_step(batch, batch_idx, window_size):
                loss, grads = grad_fn(batch, batch_idx)
                loss = ops.depend(loss, counters.count_nonfinite(loss))
                loss = ops.depend(loss, optimizer(transforms(grads)))
                loss = ops.depend(loss, logs.close_window())
                return ops.depend(loss, ops.assign_add(counters.global_step, Tensor(1, ms.int32)))

            self._window_step = None
            self.accumulators = None
        self._optimizer_step = compile_function(optimizer_step, compile)

    def window_step(self, batch, batch_idx):
        """Runs forward and backward of a micro-batch that does not end its window; returns the loss."""
        return self._window_step(batch, batch_idx)

    def optimizer_step(self, batch, batch_idx, window_size):
        """Runs the micro-batch that ends a window of `window_size` micro-batches and updates the weights."""
        return self._optimizer_step(batch, batch_idx, window_size)


def _divide(divisor, value):
    return value / divisor
