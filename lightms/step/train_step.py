"""The compiled training step: forward, loss, gradients, accumulation, transforms, update.

Three graphs are built from the same pieces:

* `optimizer_step` closes an accumulation window: it adds this micro-batch's
  gradients to the window, averages over the micro-batches the window holds,
  unscales and checks them when a loss scaler is on, runs the gradient pipeline
  (clipping, and later stages), applies the optimizer, closes the log window and
  advances the step counter.
* `window_step` (only when accumulate > 1) adds the micro-batch's gradients to
  device-side accumulators and does nothing else.
* `sink_step` (only when sink_size > 1) runs a chunk of micro-batches, stacked on
  a new leading axis, in a loop inside one graph: each iteration is a
  `window_step` or an `optimizer_step`, as the host planned it in `closes`.

The host decides what to call from its own counters, so no value comes back to
the host. With a loss scaler, an overflowing window skips the update: the
optimizer (and its own step counter and in-graph schedules) and `global_step`
do not advance, and the scale drops.
"""

from typing import Callable, Optional

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


class GraphFunction(nn.Cell):
    """Runs a Python function as one whole-graph Cell.

    `Cell.compile_and_run` executes on MindSpore's graph executor, as a Cell does in
    GRAPH_MODE, without changing the process's execution mode. A `mindspore.jit`
    function instead goes through the PyNative executor (`grad_jit`), which cost
    about 8 ms per call on this project's CPU: a 784-512-512-10 MLP step took 12 ms
    that way and 3-4 ms as a Cell, with identical losses.
    """

    def __init__(self, fn: Callable):
        super().__init__(auto_prefix=False)
        self.fn = fn

    def construct(self, *inputs):
        return self.fn(*inputs)


def compile_function(fn: Callable, compile: bool) -> Callable:
    """Returns `fn` compiled as a whole graph, or `fn` itself when `compile` is False."""
    return GraphFunction(fn).compile_and_run if compile else fn


def take_micro_batch(batches, i):
    """Row `i` of a chunk of stacked batches: a Tensor, or a flat tuple, list or dict of them (graph-parseable)."""
    if isinstance(batches, dict):
        return {key: value[i] for key, value in batches.items()}
    if isinstance(batches, list):
        return [value[i] for value in batches]
    if isinstance(batches, tuple):
        return tuple([value[i] for value in batches])
    return batches[i]


class TrainStep:
    """Builds the training graphs for one module and optimizer.

    Args:
        module: The LightningCell (its methods already made graph-callable).
        optimizer: A MindSpore optimizer over (some of) the module's parameters.
        logs: The device log buffers of training_step.
        counters: The device loop counters.
        accumulate: Micro-batches per optimizer step.
        transforms: Gradient transforms applied to the averaged, unscaled gradients.
        compile: Compile with `mindspore.jit` (True) or run eagerly (False).
        loss_scaler: A `mindspore.amp.DynamicLossScaler` (or StaticLossScaler), or None.
        sink_length: Micro-batches per `sink_step` call (stacked leading axis); 0 for no sink graph.
    """

    def __init__(self, module, optimizer, logs, counters: LoopCounters, accumulate: int,
                 transforms: GradientPipeline, compile: bool, loss_scaler=None, sink_length: int = 0):
        self.accumulate = accumulate
        weights = optimizer.parameters
        one_step = Tensor(1, ms.int32)

        def forward(batch, batch_idx):
            loss = loss_from_output(module.training_step(batch, batch_idx))
            return loss if loss_scaler is None else loss_scaler.scale(loss)

        grad_fn = ms.value_and_grad(forward, None, weights)

        def gradients(batch, batch_idx):
            loss, grads = grad_fn(batch, batch_idx)
            if loss_scaler is not None:
                loss = loss_scaler.unscale(loss)
            loss = ops.cast(loss, ms.float32)  # a half-precision loss is reported as float32
            return ops.depend(loss, counters.count_nonfinite(loss)), grads

        def update(grads):
            """Unscales, checks, transforms and applies a window's gradients; returns whether it stepped."""
            if loss_scaler is None:
                stepped = optimizer(transforms(grads))
                stepped = ops.depend(ops.ones((), ms.bool_), stepped)
            else:
                grads = loss_scaler.unscale(grads)
                stepped = ms.amp.all_finite(grads)
                if stepped:  # an overflowing window is skipped: no update, no optimizer or global step
                    stepped = ops.depend(stepped, optimizer(transforms(grads)))
                stepped = ops.depend(stepped, loss_scaler.adjust(stepped))
            stepped = ops.depend(stepped, logs.close_window())
            advance = one_step if loss_scaler is None else ops.cast(stepped, ms.int32)
            return ops.depend(stepped, ops.assign_add(counters.global_step, advance))

        self.accumulators = None
        if accumulate > 1:
            self.accumulators = ParameterTuple(
                Parameter(Tensor(np.zeros(p.shape, ms.dtype_to_nptype(p.dtype))), name=f"lightms_accum.{p.name}",
                          requires_grad=False)
                for p in weights
            )
        accumulators = self.accumulators

        def accumulate_step(loss, grads):
            return ops.depend(loss, _hyper_map(ops.assign_add, accumulators, grads))

        def window_update(grads, window_size):
            """Averages the window (this micro-batch's `grads` added), updates, and empties the window."""
            summed = _hyper_map(ops.add, accumulators, grads)
            stepped = update(_hyper_map(ops.partial(_divide, window_size), summed))
            return ops.depend(stepped, _hyper_map(ops.assign, accumulators, _hyper_map(ops.zeros_like, accumulators)))

        def window_step(batch, batch_idx):
            return accumulate_step(*gradients(batch, batch_idx))

        def optimizer_step(batch, batch_idx, window_size):
            loss, grads = gradients(batch, batch_idx)
            if accumulate > 1:
                return ops.depend(loss, window_update(grads, window_size))
            return ops.depend(loss, update(grads))

        def sink_step(batches, first_index, closes, window_sizes, count):
            i = Tensor(0, ms.int32)
            slot = Tensor(0, ms.int32)  # the next row of the step-value history
            loss = Tensor(0.0, ms.float32)
            while i < count:
                loss, grads = gradients(take_micro_batch(batches, i), first_index + i)
                if accumulate == 1:
                    stepped = update(grads)
                    loss = ops.depend(loss, logs.record_step(slot))
                    slot = slot + ops.cast(stepped, ms.int32)
                elif closes[i]:
                    stepped = window_update(grads, window_sizes[i])
                    loss = ops.depend(loss, logs.record_step(slot))
                    slot = slot + ops.cast(stepped, ms.int32)
                else:
                    loss = accumulate_step(loss, grads)
                i = i + 1
            return loss

        self._window_step = compile_function(window_step, compile) if accumulate > 1 else None
        self._optimizer_step = compile_function(optimizer_step, compile)
        self.sink_length = sink_length
        self._sink_step = None
        if sink_length:
            logs.keep_step_history(sink_length)
            self._sink_step = compile_function(sink_step, compile)

    def window_step(self, batch, batch_idx):
        """Runs forward and backward of a micro-batch that does not end its window; returns the loss."""
        return self._window_step(batch, batch_idx)

    def optimizer_step(self, batch, batch_idx, window_size):
        """Runs the micro-batch that ends a window of `window_size` micro-batches and updates the weights."""
        return self._optimizer_step(batch, batch_idx, window_size)

    def sink_step(self, batches, first_index: Tensor, closes: Tensor, window_sizes: Tensor, count: Tensor):
        """Runs `count` stacked micro-batches in one graph call; returns the last micro-batch's loss.

        Args:
            batches: The chunk, each leaf stacked on a new leading axis of length `sink_length`.
            first_index: batch_idx of the chunk's first micro-batch (int32 scalar).
            closes: Whether micro-batch i ends its accumulation window (bool, `sink_length`).
            window_sizes: Micro-batches in the window micro-batch i closes (float32, `sink_length`).
            count: Micro-batches of the chunk to run (the rest of the axis is padding).
        """
        return self._sink_step(batches, first_index, closes, window_sizes, count)


def _divide(divisor, value):
    return value / divisor


__all__ = ["LoopCounters", "TrainStep", "compile_function", "loss_from_output", "take_micro_batch"]
