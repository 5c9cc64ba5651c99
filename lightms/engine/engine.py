"""`TrainEngine`: the compiled training step, built from a `StepPlan`, run a chunk at a time.

One object owns the device program of training. It builds, from the plan:

* `optimizer_step`: the micro-batch that closes an accumulation window: forward, loss,
  gradients, the window's average (a size the host passes in), the gradient stages
  (unscale and skip when not finite under loss scaling, clipping, frozen parameters)
  and the optimizer update, the logged values' step window and the step counter;
* `window_step` (accumulate > 1): forward and backward of a micro-batch that does not
  close its window, its gradients added to device accumulators;
* `sink_step` (sink_length > 1): a chunk of micro-batches stacked on a new leading axis,
  run in a `while` loop inside one graph, each iteration one of the two above as the
  host planned it.

`run(chunk)` chooses the graph; the loop does not know which one runs. The device state
(counters, accumulators, loss scale, logged sums) is the engine's and comes out through
`state_dict()`. Each graph is a whole-graph Cell (`GraphFunction`), which runs on
MindSpore's graph executor without changing the process's execution mode.
"""

import ctypes
import ctypes.util
import sys
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple

import numpy as np

from lightms._mindspore import mindspore as ms
from mindspore import Parameter, ParameterTuple, Tensor, nn, ops

from lightms.engine.gradients import automatic_gradients, manual_gradients
from lightms.engine.plan import StepPlan
from lightms.trainer.chunks import batch_passing, row, take_micro_batch
from lightms.module.device_logs import DeviceLogBuffers

_hyper_map = ops.HyperMap()


# ---- running a Python function as one compiled graph ---------------------------------------
def release_freed_memory() -> bool:
    """Hands the C heap's freed pages back to the operating system (glibc's `malloc_trim`); False elsewhere.

    MindSpore's graph compiler frees most of what it allocates, but glibc keeps the freed
    pages, which count in the process's resident memory for the rest of the run (see
    `benchmarks/README.md`). Done once per compiled graph.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return False
    trim(0)
    return True


class GraphFunction(nn.Cell):
    """Runs a Python function as one whole-graph Cell (`Cell.compile_and_run`, as a Cell in GRAPH_MODE).

    A `mindspore.jit` function goes through the PyNative executor instead, several times
    slower per call for small steps (`benchmarks/README.md`).

    Args:
        fn: The step function.
        explain_failure: Given what MindSpore raised when compiling a graph or in its first run,
            returns a clearer error to raise instead, or None to let MindSpore's propagate.
    """

    def __init__(self, fn: Callable, explain_failure: Optional[Callable[[Exception], Optional[Exception]]] = None):
        super().__init__(auto_prefix=False)
        self.fn = fn
        self.explain_failure = explain_failure
        self._new_graph = False  # compiled in this call, or its compilation failed: not yet run once

    def construct(self, *inputs):
        return self.fn(*inputs)

    def compile_and_run(self, *args, **kwargs):
        """Compiles (once per input signature) and runs the graph; a new graph's failure is explained."""
        try:
            output = nn.Cell.compile_and_run(self, *args, **kwargs)
        except Exception as error:  # MindSpore's, from compiling or from running Python it fell back to
            clearer = self.explain_failure(error) if self._new_graph and self.explain_failure else None
            if clearer is None:
                raise
            raise clearer from None  # the user's mistake first; the clearer error carries MindSpore's text
        self._new_graph = False
        return output

    def compile(self, *args, **kwargs):
        """Compiles the graph for these inputs unless MindSpore has it already (called on every run)."""
        graphs_before = len(self.compile_cache)
        try:
            super().compile(*args, **kwargs)
        except Exception:
            self._new_graph = True
            raise
        if len(self.compile_cache) != graphs_before:
            self._new_graph = True
            release_freed_memory()


def compile_function(fn: Callable, compile: bool,
                     explain_failure: Optional[Callable[[Exception], Optional[Exception]]] = None) -> Callable:
    """`fn` compiled as a whole graph (`GraphFunction`), or `fn` itself when `compile` is False."""
    return GraphFunction(fn, explain_failure).compile_and_run if compile else fn


# ---- device counters ------------------------------------------------------------------------
class Counters(nn.Cell):
    """The loop counters as device scalars, which compiled steps read live (`self.global_step` inside a step).

    The steps advance `global_step` (by each optimizer step that happened) and `batch_idx`
    (by each micro-batch) on the device; the host writes them only when a run starts or
    resumes and, for `current_epoch`, at each epoch start. `loss_sum` adds up the run's
    training losses: not finite once one of them was NaN or infinite.
    """

    def __init__(self):
        super().__init__(auto_prefix=False)
        self.global_step = Parameter(Tensor(0, ms.int32), name="lightms.global_step", requires_grad=False)
        self.current_epoch = Parameter(Tensor(0, ms.int32), name="lightms.current_epoch", requires_grad=False)
        self.batch_idx = Parameter(Tensor(0, ms.int32), name="lightms.batch_idx", requires_grad=False)
        self.loss_sum = Parameter(Tensor(0.0, ms.float32), name="lightms.loss_sum", requires_grad=False)
        # What the host knows (plain attributes: Cell.__setattr__ is slow between steps).
        object.__setattr__(self, "host_batch_idx", 0)
        object.__setattr__(self, "host_global_step", 0)
        object.__setattr__(self, "nonfinite_warned", False)

    def set(self, current_epoch: int, global_step: int) -> None:
        """Writes the host's epoch and step to the device (`ops.assign`: `set_data` would unlink graphs)."""
        ops.assign(self.current_epoch, Tensor(current_epoch, ms.int32))
        ops.assign(self.global_step, Tensor(global_step, ms.int32))
        object.__setattr__(self, "host_global_step", global_step)

    def set_epoch(self, current_epoch: int) -> None:
        """Writes the epoch at an epoch start."""
        ops.assign(self.current_epoch, Tensor(current_epoch, ms.int32))

    def expect(self, batch_idx: int) -> None:
        """Makes the device's batch_idx equal the host's, writing only when they differ (epoch starts, resumes)."""
        if batch_idx != self.host_batch_idx:
            ops.assign(self.batch_idx, Tensor(batch_idx, ms.int32))
            object.__setattr__(self, "host_batch_idx", batch_idx)

    def advanced(self, micro_batches: int) -> None:
        """Records on the host what a step call did to the device's batch_idx."""
        object.__setattr__(self, "host_batch_idx", self.host_batch_idx + micro_batches)


def _divide(divisor, value):
    return value / divisor


# ---- the engine ---------------------------------------------------------------------------------
@dataclass
class StepReport:
    """What one `TrainEngine.run` did.

    Attributes:
        loss: The last micro-batch's loss (a device scalar, float32).
        outputs: `{"loss": loss}` and the other Tensors training_step returned in a dict (the last
            micro-batch's); None when a manual-optimization training_step returned None.
        steps: Optimizer steps taken (overflowing steps skipped under loss scaling do not count).
    """

    loss: Tensor
    outputs: Dict[str, Any]
    steps: int


class TrainEngine:
    """Builds the training graphs of a module and optimizer from a plan, and runs chunks of micro-batches.

    Args:
        module: The LightningCell (bound: its methods graph-callable, `binding.ModuleBinding`).
        optimizer: A MindSpore optimizer over (some of) the module's parameters.
        plan: What the graphs compute.
        counters: The run's device counters.
        inside: `hook, log target -> context` in which the module's step code runs
            (`ModuleBinding.inside`).
        example: A batch (its `data`: Tensors) shaped like the run's: how graphs receive batches.
        autocast: Wraps training_step for mixed precision (`Precision.autocast`), or None.
        loss_scaler: A `mindspore.amp` loss scaler when `plan.loss_scaling`, else None.
        explain_failure: Turns a new graph's failure into a clearer error, or None.
        example_step: Under DP-SGD, training_step of a view of the module that logs nothing
            (`ModuleBinding.silent_twin`), for the per-example gradients.
    """

    def __init__(self, module, optimizer, plan: StepPlan, counters: Counters, inside: Callable, example,
                 autocast: Optional[Callable] = None, loss_scaler=None, explain_failure: Optional[Callable] = None,
                 example_step: Optional[Callable] = None):
        self.module, self.optimizer, self.plan, self.counters, self.inside = module, optimizer, plan, counters, inside
        self.loss_scaler, self.example = loss_scaler, example
        self.privacy = None
        if plan.privacy:
            from lightms.privacy.dpsgd import PrivacyStage

            self.privacy = PrivacyStage(*plan.privacy, [p.shape for p in optimizer.parameters])
        sink_length = plan.sink_length if plan.sink_length > 1 else 0
        self.logs = DeviceLogBuffers(list(plan.logs), single_batch_windows=plan.accumulate == 1,
                                     window_is_step=plan.accumulate == 1 and not sink_length,
                                     history_length=sink_length if plan.step_history else 0,
                                     world_size=plan.world_size)
        self.accumulators = None
        if plan.accumulate > 1:
            self.accumulators = ParameterTuple(
                Parameter(ops.zeros(p.shape, p.dtype), name=f"lightms_accum.{p.name}", requires_grad=False)
                for p in optimizer.parameters)
        passing = batch_passing(example.data, plan.compile)
        self._pack = passing.pack
        if example_step is not None and autocast is not None:
            example_step = autocast(example_step)
        graphs = _Graphs(module, optimizer, plan, counters, self.logs, self.accumulators, passing.unpack,
                         autocast, loss_scaler, self.privacy, example_step, example.data)
        self._window_step = compile_function(graphs.window_step, plan.compile, explain_failure) \
            if plan.accumulate > 1 else None
        self._optimizer_step = compile_function(graphs.optimizer_step, plan.compile, explain_failure)
        self._sink_step = compile_function(graphs.sink_step, plan.compile, explain_failure) if sink_length else None
        # Scalars the graphs take, made once: a fresh Tensor per call costs host time between steps.
        self._window_sizes = {size: Tensor(float(size), ms.float32) for size in range(1, plan.accumulate + 1)}
        self._sink_inputs: Dict[Tuple, Tuple[Tensor, Tensor]] = {}
        self._sink_shapes = None  # the shapes of the first sunk chunk: chunks of them are padded to the sink length
        self._keys = ("loss",) + plan.output_keys

    def run(self, chunk) -> StepReport:
        """Trains on a chunk's micro-batches: one graph call when sunk, else one per micro-batch.

        Args:
            chunk: A `trainer.chunks.Chunk` (its batches, the window size each closes, stacked buffers).
        """
        first, counters = chunk.batches[0], self.counters
        self.logs.set_batch_size(first.size)
        counters.expect(first.index)
        noise = self._noise(chunk) if self.privacy is not None else ()
        with self.inside("training_step", self.logs):
            if chunk.length:
                result = self._sink_step(*chunk.device_inputs(self._stacked_length(chunk), self._sink_inputs),
                                         *noise)
            elif chunk.sizes[0] and self.plan.accumulate > 1:
                result = self._optimizer_step(self._window_sizes[chunk.sizes[0]], *noise, *self._pack(first.data))
            elif chunk.sizes[0]:
                result = self._optimizer_step(*noise, *self._pack(first.data))
            else:
                result = self._window_step(*self._pack(first.data))
        counters.advanced(len(chunk.batches))
        steps = chunk.steps
        if self.loss_scaler is not None and steps:  # overflowing steps were skipped: the device knows how many
            steps = int(counters.global_step.asnumpy()) - counters.host_global_step
        object.__setattr__(counters, "host_global_step", counters.host_global_step + steps)
        outputs = dict(zip(self._keys, result)) if self.plan.outputs else {"loss": result}
        if not self.plan.returns_loss:  # manual optimization's training_step returned None: so do the hooks see it
            return StepReport(outputs["loss"], None, steps)
        return StepReport(outputs["loss"], outputs, steps)

    def _noise(self, chunk) -> Tuple[Tensor, ...]:
        """DP-SGD's noise for the chunk's optimizer steps, drawn in step order: a flat row for a single call, or
        one row per stacked micro-batch (zeros where no window closes) for a sunk call."""
        stream = self.privacy.stream
        if not chunk.length:
            return (Tensor(stream.draw(1)[0]),) if chunk.sizes[0] else ()
        rows = np.zeros((self._stacked_length(chunk), stream.size), np.float32)
        closing = [i for i, size in enumerate(chunk.sizes) if size]
        rows[closing] = stream.draw(len(closing))
        return (Tensor(rows),)

    def _stacked_length(self, chunk) -> int:
        """The leading axis of a chunk's stacked batches: the sink length for the run's usual shapes (the graph
        compiles once), the chunk's own length for other shapes (a smaller last batch: one more compile)."""
        if self._sink_shapes is None:
            self._sink_shapes = chunk.shapes
        return self.plan.sink_length if chunk.shapes == self._sink_shapes else len(chunk.batches)

    # ---- state ---------------------------------------------------------------------------------
    def state_dict(self, window: int) -> Tuple[Dict[str, Tensor], Dict]:
        """The engine's device state, for a checkpoint.

        Args:
            window: Micro-batches in the open accumulation window (its gradients are saved then).

        Returns:
            (name -> Tensor to store, JSON-serialisable state): the accumulators (inside a window) and
            the loss scale; DP-SGD's noise stream and window count; the logged names' epoch and window sums.
        """
        tensors = {}
        if window and self.accumulators is not None:
            tensors.update({f"accumulator.{p.name}": p for p in self.accumulators})
        if self.privacy is not None:
            tensors.update(self.privacy.state_parameters())
        if self.loss_scaler is not None:
            tensors["loss_scale.scale_value"] = self.loss_scaler.scale_value
            tensors["loss_scale.counter"] = self.loss_scaler.counter
        state = {"logs": self.logs.state_dict(with_window=bool(window))}
        if self.privacy is not None:
            state["noise"] = self.privacy.stream.state_dict()
        return tensors, state

    def load_state_dict(self, tensors: Dict[str, np.ndarray], state: Dict) -> None:
        """Restores what `state_dict` returned (in a checkpoint: see `checkpoint.run_state`).

        A loss scale saved by a run without loss scaling, or missing from one, is left at its
        initial value; the logged epoch sums of a run that logged other names start afresh, with a warning.

        Raises:
            ValueError: If an accumulator does not fit (another model or optimizer).
        """
        from lightms.checkpoint.io import assign_checked, check_parameters

        targets = self.state_dict(1)[0]
        known = {name: value for name, value in tensors.items() if name in targets}
        wanted = {name: targets[name] for name in known}
        # An accumulator may hold an infinity (an overflowing window under loss scaling): no finite rule here.
        assign_checked(check_parameters(wanted, {name: Tensor(value) for name, value in known.items()},
                                        "training state", "the checkpoint"))
        if self.privacy is not None and "noise" in state:
            self.privacy.stream.load_state_dict(state["noise"])
        logs = state.get("logs")
        if logs is None:
            return
        try:
            self.logs.load_state_dict(logs)
        except ValueError as error:
            warnings.warn(f"Resuming mid-epoch: {error}", stacklevel=3)


class _Graphs:
    """The step functions of a plan (graph-parseable closures over the engine's pieces)."""

    def __init__(self, module, optimizer, plan: StepPlan, counters: Counters, logs: DeviceLogBuffers,
                 accumulators, unpack, autocast, loss_scaler, privacy=None, example_step=None, example_batch=None):
        one, stepped_constant = Tensor(1, ms.int32), Tensor(True, ms.bool_)
        has_outputs = bool(plan.outputs)
        training_step = module.training_step if autocast is None else autocast(module.training_step)
        if plan.manual:
            gradients, apply = manual_gradients(plan, counters, training_step, one)
        else:
            gradients, apply = automatic_gradients(module, optimizer, plan, counters, training_step, one,
                                                  loss_scaler, privacy, example_step, example_batch)

        noisy = privacy is not None  # DP-SGD: each optimizer step's graph input has a row of noise
        reduce = None
        if plan.world_size > 1 and not plan.manual:  # (manual optimization reduces in self.value_and_grad)
            from lightms.distributed.reduction import gradient_mean

            reduce = gradient_mean(plan.world_size)

        def update(grads, history_slot=None, noise=None):
            """Unscales, checks and applies a window's gradients, closes the log window; returns whether it stepped.

            `history_slot`: under sinking, where the closed log window goes (`DeviceLogBuffers.close_window`).
            `noise`: DP-SGD's standard normal row for this step.
            """
            if reduce is not None:  # first: every worker then unscales, checks and clips the same gradients
                grads = reduce(grads)
            if loss_scaler is None:
                stepped = ops.depend(stepped_constant, apply(grads, noise))
            else:
                grads = loss_scaler.unscale(grads)
                stepped = ms.amp.all_finite(grads)
                if stepped:  # an overflowing window is skipped: no update, no optimizer or global step
                    stepped = ops.depend(stepped, apply(grads))
                stepped = ops.depend(stepped, loss_scaler.adjust(stepped))
            stepped = ops.depend(stepped, logs.close_window(history_slot))
            advance = one if loss_scaler is None else ops.cast(stepped, ms.int32)
            return ops.depend(stepped, ops.assign_add(counters.global_step, advance))

        def window_update(grads, window_size, noise=None):
            """Averages the window of `window_size` micro-batches (this one's `grads` added), updates, empties it."""
            summed = _hyper_map(ops.add, accumulators, grads)
            if noisy:  # DP-SGD divides the noised sum by the window's examples
                stepped = update(summed, None, noise)
            else:
                stepped = update(_hyper_map(ops.partial(_divide, window_size), summed))
            return ops.depend(stepped, _hyper_map(ops.assign, accumulators, _hyper_map(ops.zeros_like, accumulators)))

        def result(loss, extras):
            return (loss,) + extras if has_outputs else loss

        def window_step(*inputs):
            loss, extras, grads = gradients(unpack(*inputs))
            return result(ops.depend(loss, _hyper_map(ops.assign_add, accumulators, grads)), extras)

        def optimizer_step(*inputs):
            if logs.window_is_step:
                logs.open_window()  # a side effect on the window: ordered before training_step's records
            noise = inputs[0] if noisy else None
            if noisy:
                inputs = inputs[1:]
            loss, extras, grads = gradients(unpack(*inputs))
            return result(ops.depend(loss, update(grads, None, noise)), extras)

        def window_optimizer_step(window_size, *inputs):
            noise = inputs[0] if noisy else None
            if noisy:
                inputs = inputs[1:]
            loss, extras, grads = gradients(unpack(*inputs))
            return result(ops.depend(loss, window_update(grads, window_size, noise)), extras)

        # With one micro-batch per step and no skipped steps, a closed log window goes straight to history
        # row i, and the chunk's last row becomes the step value after the loop.
        every_iteration_steps = plan.accumulate == 1 and loss_scaler is None
        direct_history = every_iteration_steps and plan.step_history
        accumulate = plan.accumulate

        def iteration(batches, window_sizes, noise_rows, i, loss, slot):
            """Micro-batch `i` of a sunk chunk: (its loss, the next history row, its extra outputs)."""
            loss, extras, grads = gradients(take_micro_batch(batches, i))
            noise = row(noise_rows, i) if noisy else None
            if accumulate == 1:
                if direct_history:
                    loss = ops.depend(loss, update(grads, i, noise))
                else:
                    stepped = update(grads, None, noise)
                    loss = ops.depend(loss, stepped)  # keeps the update: an unused result's effects can be dropped
                    if plan.step_history:  # a skipped (overflowing) step takes no row
                        loss = ops.depend(loss, logs.record_step(slot))
                        slot = slot + ops.cast(stepped, ms.int32)
            else:
                window_size = row(window_sizes, i)  # read once: each read is a kernel
                if window_size > 0:
                    stepped = window_update(grads, window_size, noise)
                    loss = ops.depend(loss, stepped)
                    if plan.step_history:
                        loss = ops.depend(loss, logs.record_step(slot))
                        slot = slot + ops.cast(stepped, ms.int32)
                else:
                    loss = ops.depend(loss, _hyper_map(ops.assign_add, accumulators, grads))
            return loss, slot, extras

        def sink_step(batches, window_sizes, count, *noise):
            noise_rows = noise[0] if noisy else None  # DP-SGD: row i is the noise of micro-batch i's step
            i = Tensor(0, ms.int32)
            slot = Tensor(0, ms.int32)  # the next row of the step-value history
            loss, extras = Tensor(0.0, ms.float32), ()
            if has_outputs:  # the first micro-batch before the loop: the loop carries its outputs' types and shapes
                loss, slot, extras = iteration(batches, window_sizes, noise_rows, i, loss, slot)
                i = i + 1
            while i < count:
                loss, slot, extras = iteration(batches, window_sizes, noise_rows, i, loss, slot)
                i = i + 1
            if direct_history:
                loss = ops.depend(loss, logs.step_from_history(count - 1))
            return result(loss, extras)

        self.window_step = window_step
        self.optimizer_step = window_optimizer_step if plan.accumulate > 1 else optimizer_step
        self.sink_step = sink_step


__all__ = ["Counters", "GraphFunction", "StepReport", "TrainEngine", "compile_function", "release_freed_memory"]
