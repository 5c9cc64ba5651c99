"""The compiled training step: forward, loss, gradients, accumulation, transforms, update.

Three graphs are built from the same pieces:

* `optimizer_step` closes an accumulation window: it adds this micro-batch's
  gradients to the window, averages over the micro-batches the window holds (a
  size the host passes in),
  unscales and checks them when a loss scaler is on, runs the gradient pipeline
  (clipping, and later stages), applies the optimizer, closes the log window and
  advances the step counter.
* `window_step` (only when accumulate > 1) adds the micro-batch's gradients to
  device-side accumulators and does nothing else.
* `sink_step` (only when sink_size > 1) runs a chunk of micro-batches, stacked on
  a new leading axis, in a loop inside one graph: each iteration is a
  `window_step` or an `optimizer_step`, as the host planned it in `window_sizes`.

The host decides what to call from its own counters, so no value comes back to
the host. With a loss scaler, an overflowing window skips the update: the
optimizer (and its own step counter and in-graph schedules) and `global_step`
do not advance, and the scale drops.
"""

from dataclasses import dataclass
from typing import Callable, Optional

from lightms._mindspore import mindspore as ms
from mindspore import Parameter, ParameterTuple, Tensor, nn, ops

from lightms.step.binding import reads_argument, reads_attribute
from lightms.step.graph import BatchPassing, compile_function
from lightms.step.gradients import GradientPipeline

_hyper_map = ops.HyperMap()


@dataclass
class HostCounters:
    """What the host knows of the device counters: batch_idx, and whether non-finite losses were warned about."""

    batch_idx: int = 0
    nonfinite_warned: bool = False


class LoopCounters(nn.Cell):
    """Device copies of the loop counters that compiled steps read live."""

    def __init__(self):
        super().__init__(auto_prefix=False)
        self.global_step = Parameter(Tensor(0, ms.int32), name="lightms.global_step", requires_grad=False)
        self.current_epoch = Parameter(Tensor(0, ms.int32), name="lightms.current_epoch", requires_grad=False)
        # The sum of the run's training losses: not finite once one of them was NaN or infinite. The host
        # reads it at epoch ends (every optimizer step under detect_anomaly). One kernel a micro-batch: a
        # count of the non-finite losses took three, and each small kernel costs 10-20 us on the CPU backend.
        self.loss_sum = Parameter(Tensor(0.0, ms.float32), name="lightms.loss_sum", requires_grad=False)
        # batch_idx of the next micro-batch, kept on the device: a fresh scalar Tensor input per call cost
        # about 0.25 ms on the CPU backend. (A window's size is an input, from Tensors made once.)
        self.batch_idx = Parameter(Tensor(0, ms.int32), name="lightms.batch_idx", requires_grad=False)
        # What the host knows of them, a plain object (Cell.__setattr__ costs ~10 us a call); a new run's
        # counters start at zero, and nothing is warned about yet.
        self.host = HostCounters()
        self.tracks_batch_idx = True  # False when training_step never reads batch_idx (set by TrainStep)
        # Whether a compiled step reads the device's current_epoch / global_step, so that the host must
        # write them at every epoch start (set by the trainer from the module's code and its precision).
        self.epoch_read = True
        self.global_step_read = True
        self._zero = Tensor(0, ms.int32)

    def add_loss(self, loss):
        """Adds a micro-batch's float32 loss to `loss_sum` (graph-parseable).

        NaN and infinities propagate through the sum, so it is finite exactly when every
        loss was, unless finite losses added up past float32's range (3.4e38).
        """
        return ops.assign_add(self.loss_sum, loss)

    def set(self, current_epoch: int, global_step: int, read_only: bool = False) -> None:
        """Writes the host's counters to the device (no sync; `set_data` would unlink compiled graphs).

        Args:
            current_epoch: The host's epoch.
            global_step: The host's optimizer step count.
            read_only: Write only the counters a compiled step reads (at an epoch start): a
                fresh scalar Tensor as an op input cost about 0.3 ms on the CPU backend, so the
                others keep the values written when the run started or resumed.
        """
        if self.epoch_read or not read_only:
            ops.assign(self.current_epoch, Tensor(current_epoch, ms.int32))
        if self.global_step_read or not read_only:
            ops.assign(self.global_step, Tensor(global_step, ms.int32))

    def expect(self, batch_idx: int) -> None:
        """Makes the device's batch_idx counter equal the host's, writing only when they differ.

        The steps advance it on the device; the host mirrors it and writes only at epoch
        starts and resumes.
        """
        host = self.host
        if batch_idx != host.batch_idx and self.tracks_batch_idx:
            ops.assign(self.batch_idx, self._zero if batch_idx == 0 else Tensor(batch_idx, ms.int32))
        host.batch_idx = batch_idx

    def advanced(self, micro_batches: int) -> None:
        """Records on the host what a step call did to the device counters."""
        self.host.batch_idx += micro_batches


def loss_from_output(output):
    """Picks the loss out of what training_step returned (graph-parseable)."""
    if isinstance(output, dict):
        return output["loss"]
    return output


def row(stacked, i):
    """Row `i` (a 0-d int32 Tensor, never negative) of a stacked Tensor, as one Gather kernel (graph-parseable).

    `stacked[i]` first maps a negative index into range: three more kernels (Less, Add,
    Select, shared by the leaves) in every iteration of the sunk loop.
    """
    return ops.gather(stacked, i, 0)


def take_micro_batch(batches, i):
    """Row `i` of a chunk of stacked batches: a Tensor, or a flat tuple, list or dict of them (graph-parseable)."""
    if isinstance(batches, dict):
        return {key: row(value, i) for key, value in batches.items()}
    if isinstance(batches, list):
        return [row(value, i) for value in batches]
    if isinstance(batches, tuple):
        return tuple([row(value, i) for value in batches])
    return row(batches, i)


class TrainStep:
    """Builds the training graphs for one module and optimizer.

    Args:
        module: The LightningCell (its methods already made graph-callable).
        optimizer: A MindSpore optimizer over (some of) the module's parameters.
        logs: The device log buffers of training_step.
        counters: The device loop counters.
        accumulate: Micro-batches per optimizer step.
        transforms: Gradient transforms applied to the averaged, unscaled gradients.
        compile: Run as compiled whole graphs (True) or eagerly (False).
        loss_scaler: A `mindspore.amp.DynamicLossScaler` (or StaticLossScaler), or None.
        sink_length: Micro-batches per `sink_step` call (stacked leading axis); 0 for no sink graph.
        step_history: Keep each sunk optimizer step's logged values for the loggers (False: no logger).
        autocast: Wraps the forward function for mixed precision (`Precision.autocast`), or None.
        passing: How `window_step` and `optimizer_step` get their batch (`graph.batch_passing`).
        explain_failure: Turns a new graph's failure into a clearer error, or None (`graph.GraphFunction`).
    """

    def __init__(self, module, optimizer, logs, counters: LoopCounters, accumulate: int,
                 transforms: GradientPipeline, compile: bool, loss_scaler=None, sink_length: int = 0,
                 autocast: Optional[Callable] = None, step_history: bool = True, *, passing: BatchPassing,
                 explain_failure: Optional[Callable] = None):
        self.accumulate = accumulate
        # Log-window kernels each step can skip (`DeviceLogBuffers`): with one micro-batch per window,
        # with one window per graph call, and with records that just overwrite their value.
        logs.single_batch_windows = accumulate == 1
        logs.overwrites = accumulate == 1 and logs.logged_once and not logs.keeps_epoch
        logs.window_is_step = logs.overwrites or (accumulate == 1 and not sink_length)
        self._pack = passing.pack
        unpack = passing.unpack
        weights = optimizer.parameters
        one_step, stepped_constant = Tensor(1, ms.int32), Tensor(True, ms.bool_)
        # Each device input or counter update costs every step (a kernel, roughly 10-15 us on the CPU
        # backend): keep the batch_idx counter only if training_step reads batch_idx, and advance
        # global_step on the device only if some method reads self.global_step or the loss scaler
        # needs it (the host counts anyway).
        from lightms.module.cell import LightningCell

        tracks_batch_idx = reads_argument(type(module).training_step, 2)
        counters.tracks_batch_idx = tracks_batch_idx
        tracks_global_step = loss_scaler is not None or reads_attribute(type(module), LightningCell, "global_step")

        training_step = module.training_step if autocast is None else autocast(module.training_step)

        def forward(batch, batch_idx):
            loss = loss_from_output(training_step(batch, batch_idx))
            return loss if loss_scaler is None else loss_scaler.scale(loss)

        grad_fn = ms.value_and_grad(forward, None, weights)

        def gradients(batch):
            if tracks_batch_idx:
                loss, grads = grad_fn(batch, counters.batch_idx)
                loss = ops.depend(loss, ops.assign_add(counters.batch_idx, one_step))
            else:
                loss, grads = grad_fn(batch, 0)
            if loss_scaler is not None:
                loss = loss_scaler.unscale(loss)
            loss = ops.cast(loss, ms.float32)  # a half-precision loss is reported as float32
            return ops.depend(loss, counters.add_loss(loss)), grads

        def update(grads, history_slot=None):
            """Unscales, checks, transforms and applies a window's gradients; returns whether it stepped.

            `history_slot`: under sinking, where the closed log window goes (`DeviceLogBuffers.close_window`).
            """
            if loss_scaler is None:
                stepped = ops.depend(stepped_constant, optimizer(transforms(grads)))
            else:
                grads = loss_scaler.unscale(grads)
                stepped = ms.amp.all_finite(grads)
                if stepped:  # an overflowing window is skipped: no update, no optimizer or global step
                    stepped = ops.depend(stepped, optimizer(transforms(grads)))
                stepped = ops.depend(stepped, loss_scaler.adjust(stepped))
            stepped = ops.depend(stepped, logs.close_window(history_slot))
            if not tracks_global_step:
                return stepped
            advance = one_step if loss_scaler is None else ops.cast(stepped, ms.int32)
            return ops.depend(stepped, ops.assign_add(counters.global_step, advance))

        self.accumulators = None
        if accumulate > 1:
            self.accumulators = ParameterTuple(
                Parameter(ops.zeros(p.shape, p.dtype), name=f"lightms_accum.{p.name}", requires_grad=False)
                for p in weights
            )
        accumulators = self.accumulators

        def accumulate_step(loss, grads):
            return ops.depend(loss, _hyper_map(ops.assign_add, accumulators, grads))

        def window_update(grads, window_size):
            """Averages the window of `window_size` micro-batches (this one's `grads` added), updates, empties it.

            The host knows every window's size, so it is an input (a float32 scalar), not a
            device counter: that was one kernel per micro-batch and three per window.
            """
            summed = _hyper_map(ops.add, accumulators, grads)
            stepped = update(_hyper_map(ops.partial(_divide, window_size), summed))
            return ops.depend(stepped, _hyper_map(ops.assign, accumulators, _hyper_map(ops.zeros_like, accumulators)))

        def window_step(*inputs):
            return accumulate_step(*gradients(unpack(*inputs)))

        def optimizer_step(*inputs):
            if logs.window_is_step and not logs.overwrites:
                logs.open_window()  # a side effect on the window: ordered before training_step's records
            loss, grads = gradients(unpack(*inputs))
            return ops.depend(loss, update(grads))

        def window_optimizer_step(window_size, *inputs):
            loss, grads = gradients(unpack(*inputs))
            return ops.depend(loss, window_update(grads, window_size))

        # Each kernel in the loop body costs every iteration (10-20 us each on the CPU backend). So with one
        # micro-batch per step and no skipped steps, a closed log window goes straight to history row i, the
        # chunk's last one becoming the step value after the loop, unless the window already holds it
        # (`window_is_step`; the MLP loop body went from 102 to 100 kernels, counted in MindSpore's
        # graph_build IR).
        every_iteration_steps = accumulate == 1 and loss_scaler is None
        direct_history = every_iteration_steps and step_history

        def sink_step(batches, window_sizes, count):
            i = Tensor(0, ms.int32)
            slot = Tensor(0, ms.int32)  # the next row of the step-value history
            loss = Tensor(0.0, ms.float32)
            while i < count:
                loss, grads = gradients(take_micro_batch(batches, i))
                if accumulate == 1:
                    if direct_history:
                        loss = ops.depend(loss, update(grads, i))
                    else:
                        stepped = update(grads)
                        loss = ops.depend(loss, stepped)  # keeps the update: an unused result's effects can be dropped
                        if step_history:  # a skipped (overflowing) step takes no row
                            loss = ops.depend(loss, logs.record_step(slot))
                            slot = slot + ops.cast(stepped, ms.int32)
                else:
                    window_size = row(window_sizes, i)  # read once: each read is a kernel
                    if window_size > 0:
                        stepped = window_update(grads, window_size)
                        loss = ops.depend(loss, stepped)
                        if step_history:
                            loss = ops.depend(loss, logs.record_step(slot))
                            slot = slot + ops.cast(stepped, ms.int32)
                    else:
                        loss = accumulate_step(loss, grads)
                i = i + 1
            if direct_history and not logs.window_is_step:  # else the window holds the last step's values
                loss = ops.depend(loss, logs.step_from_history(count - 1))
            return loss

        self._window_step = compile_function(window_step, compile, explain_failure) if accumulate > 1 else None
        self._optimizer_step = compile_function(window_optimizer_step if accumulate > 1 else optimizer_step, compile,
                                               explain_failure)
        # The window sizes a window step can have, made once: a fresh Tensor per call costs host time.
        self._window_sizes = {size: Tensor(float(size), ms.float32) for size in range(1, accumulate + 1)} \
            if accumulate > 1 else {}
        self._sink_step = None
        if sink_length:
            if step_history:
                logs.keep_step_history(sink_length)
            self._sink_step = compile_function(sink_step, compile, explain_failure)

    def window_step(self, batch):
        """Runs forward and backward of a micro-batch that does not end its window; returns the loss.

        Its batch_idx is the device counter (`LoopCounters.expect`).
        """
        return self._window_step(*self._pack(batch))

    def optimizer_step(self, batch, window_size: int = 1):
        """Runs the micro-batch that ends its window and updates the weights; returns the loss.

        Args:
            batch: The micro-batch.
            window_size: Micro-batches in the window it ends, itself included (1 to `accumulate`).
        """
        if self.accumulate > 1:
            return self._optimizer_step(self._window_sizes[window_size], *self._pack(batch))
        return self._optimizer_step(*self._pack(batch))

    def sink_step(self, batches, window_sizes: Tensor, count: Tensor):
        """Runs `count` stacked micro-batches in one graph call; returns the last micro-batch's loss.

        Args:
            batches: The chunk, each leaf stacked on a new leading axis of length `sink_length`.
            window_sizes: For each micro-batch, the size of the window it ends, or 0 if it ends none
                (float32, `sink_length`).
            count: Micro-batches of the chunk to run (the rest of the axis is padding).
        """
        return self._sink_step(batches, window_sizes, count)


def _divide(divisor, value):
    return value / divisor


__all__ = ["LoopCounters", "TrainStep", "loss_from_output", "take_micro_batch"]
