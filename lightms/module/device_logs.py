"""The device buffers a compiled step's `self.log` writes to.

A compiled step cannot append to a Python dict (graph mode does not replay
Python side effects), so logged values live in MindSpore `Parameter` vectors,
one slot per logged name, updated inside the graph. The names and their slots
are fixed before compilation by a dry run of the hook (`logging.LogRecorder`). The
host reads the buffers only when somebody asks (a logger, the progress bar, a
callback): steps where nobody listens cost no device-to-host copy.
"""

import dataclasses
from typing import Dict, List

import numpy as np

from lightms._mindspore import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops

from lightms.module.logging import INITIAL, LogOptions

# Rows of each DeviceLogBuffers level: the reduced value and its weight. Means are kept as weighted sums.
VALUE, WEIGHT = 0, 1


def empty_level(options: List[LogOptions]) -> np.ndarray:
    """A (value, weight) level where nothing is logged yet: each reduction's start, weight 0 (one column at least)."""
    initial = np.zeros(max(len(options), 1), np.float32)
    initial[:len(options)] = [INITIAL[opt.reduce_fx] for opt in options]
    return np.stack([initial, np.zeros_like(initial)])


class DeviceLogBuffers(nn.Cell):
    """Device-side accumulators for the names one hook logs.

    Three levels, each a (2, names) Parameter of (reduced value, weight) rows: the
    open window (the micro-batches of one optimizer step), the last closed window
    (the step value) and the epoch. Means are weighted by batch size; `sum`, `max`
    and `min` reduce as named. A weight above 0 says the name was logged at that
    level, so a name logged only on some steps is reported only at those steps.
    Every small kernel costs every step, so the hot path is short: a `self.log` of a
    mean or sum is a stack and a scatter-add into its own column (so a NaN or infinite
    value stays in its column), plus a multiply by the batch size where the weight
    matters; closing a window is at most three whole-level copies and adds.

    Args:
        options: What the dry run recorded, in slot order.
        single_batch_windows: Every window holds one micro-batch (accumulate=1): a name without
            `on_epoch` skips the batch-size multiply.
        window_is_step: The step graph runs one window per call: the window itself is the step
            level, emptied as the next step starts (`open_window`).
        history_length: Under sinking with a logger, keep the step values of up to this many
            optimizer steps of one chunk (`record_step`); 0 for none.
        world_size: Data-parallel workers: with more than one, the step values of names logged with
            `sync_dist=True` are reduced over them inside the graph, as each window closes, and their
            epoch values in `read_epoch`. 1 for evaluation steps: every worker evaluates all the data.
    """

    def __init__(self, options: List[LogOptions], single_batch_windows: bool = False, window_is_step: bool = False,
                 history_length: int = 0, world_size: int = 1):
        super().__init__(auto_prefix=False)
        self.options = list(options)
        self.index = {opt.name: i for i, opt in enumerate(self.options)}
        self.single_batch_windows = single_batch_windows
        self.window_is_step = window_is_step
        count = max(len(self.options), 1)  # a zero-width Parameter is awkward to update
        self._initial_level = empty_level(self.options)
        self.host_reads = 0  # device-to-host reads of these buffers, for the trainer's sync count
        self.has_extremes = any(opt.reduce_fx in ("max", "min") for opt in self.options)
        # Per name: the (value, weight) cells of its column, for scatter updates.
        self.cells = [Tensor(np.array([[VALUE, i], [WEIGHT, i]], np.int32)) for i in range(count)]
        pad = [False] * (count - len(self.options))
        eye = np.eye(count, dtype=bool)
        self.value_masks = [Tensor(np.outer([True, False], eye[i])) for i in range(count)]  # extremes only
        self.weight_masks = [Tensor(np.outer([False, True], eye[i])) for i in range(count)]
        value_row = np.array([[True], [False]])
        self.max_cells = Tensor(value_row & np.array([opt.reduce_fx == "max" for opt in self.options] + pad))
        self.min_cells = Tensor(value_row & np.array([opt.reduce_fx == "min" for opt in self.options] + pad))
        self.opened = Tensor(self._initial_level)
        self.one = Tensor(1.0, ms.float32)
        self.window = Parameter(Tensor(self._initial_level), name="lightms_log.window", requires_grad=False)
        self.step = Parameter(Tensor(self._initial_level), name="lightms_log.step", requires_grad=False)
        self.epoch = Parameter(Tensor(self._initial_level), name="lightms_log.epoch", requires_grad=False)
        self.batch_size = Parameter(Tensor(1.0, ms.float32), name="lightms_log.batch_size", requires_grad=False)
        self._host_batch_size = 1.0
        self._batch_size_tensors = {}
        # The epoch level is kept only if some name reports it (training_step's default is on_step only).
        self.keeps_epoch = any(opt.on_epoch for opt in self.options)
        self.history = None  # step values of the optimizer steps of one sunk chunk
        self.world_size = world_size
        # Only names that report step values: the epoch level is reduced at the epoch's end (`read_epoch`).
        self.sync = _StepSync(self.options, count) if world_size > 1 and any(
            o.sync_dist and o.on_step for o in self.options) else None
        if history_length:
            self.history = Parameter(Tensor(np.zeros((history_length,) + self._initial_level.shape, np.float32)),
                                     name="lightms_log.history", requires_grad=False)

    def record_step(self, slot):
        """Copies the last closed window (the step value) into history row `slot` (graph-parseable)."""
        level = self.window if self.window_is_step else self.step
        return ops.scatter_update(self.history, slot.reshape((1,)), level.reshape((1,) + level.shape))

    def step_from_history(self, slot):
        """Makes history row `slot` the step value (graph-parseable; after `close_window(slot)` calls)."""
        return ops.assign(self.step, ops.gather(self.history, slot.reshape((1,)), 0).reshape(self.step.shape))

    def set_batch_size(self, size: int) -> None:
        """Sets the weight of the next step's means, from the host and only when it changes.

        Kept out of the compiled step on purpose: every extra Parameter write inside
        the graph cost a few percent of an MLP step on the CPU backend.
        """
        if size != self._host_batch_size:
            weight = self._batch_size_tensors.get(size)
            if weight is None:
                # Made once per size: a fresh scalar Tensor as an op input costs host time.
                weight = self._batch_size_tensors[size] = Tensor(float(size), ms.float32)
            ops.assign(self.batch_size, weight)
            self._host_batch_size = size

    def log(self, hook, name, value, prog_bar, logger, on_step, on_epoch, reduce_fx, batch_size, sync_dist=False):
        """`LightningCell.log` inside a step: the options were checked by the dry run."""
        return self.record(name, value, reduce_fx, batch_size)

    def record(self, name, value, reduce_fx, batch_size):
        """Adds one logged value to the open window (graph-parseable).

        Args:
            name: A name the dry run recorded.
            value: A scalar Tensor or number.
            reduce_fx: The name's reduction.
            batch_size: The explicit weight, or None for the current batch size.
        """
        if name not in self.index:
            raise ValueError(
                "self.log(" + name + ") was not called when lightms ran this hook on the first batch, "
                "so it has no slot in the compiled step. Call self.log for every name on every batch."
            )
        i = self.index[name]
        if not isinstance(value, Tensor) or value.dtype != ms.float32:  # decided as the graph is built
            value = ops.cast(value, ms.float32)
        value = value.reshape(())  # a reshape launches no kernel
        if reduce_fx in ("mean", "sum"):
            update = ops.stack([value, self.one])  # (value, weight 1)
            # A window of one micro-batch: every record of a name in it has the same weight (a name's
            # batch_size is one of its options, fixed per run), so the weight matters only to the epoch's mean.
            weighted = not self.single_batch_windows or self.options[i].on_epoch
            if reduce_fx == "mean" and weighted:
                update = update * (self.batch_size if batch_size is None else ops.cast(batch_size, ms.float32))
            ops.scatter_nd_add(self.window, self.cells[i], update)
        else:
            window = self.window
            extreme = ops.maximum(window, value) if reduce_fx == "max" else ops.minimum(window, value)
            ops.assign(window, ops.where(self.value_masks[i], extreme,
                                         ops.where(self.weight_masks[i], window + 1.0, window)))
        return value

    def close_window(self, history_slot=None):
        """Makes the open window the step value, adds it to the epoch, and opens a new one (graph-parseable).

        Without `on_epoch` names nothing is added to the epoch level. When the window is the
        step level (`window_is_step`), it stays as it is: the next step's `open_window` empties it.

        Args:
            history_slot: Under sinking, write the step value to this row of the history
                instead of to the step level (one kernel instead of two per step; unless the
                window is the step level, the chunk ends with `step_from_history`). None: to
                the step level.
        """
        window = self.window
        # The step value: this worker's window, with the names logged with sync_dist reduced over the workers.
        # The epoch level adds this worker's own window (`read_epoch` reduces it), as Lightning does.
        step = self.sync(window) if self.sync is not None else window
        if history_slot is not None:
            done = ops.scatter_update(self.history, history_slot.reshape((1,)), step.reshape((1,) + step.shape))
        elif self.window_is_step:
            done = self.one  # the window stays as the step level (until `open_window`, if it is emptied)
        else:
            done = ops.assign(self.step, step)
        if self.keeps_epoch and self.has_extremes:
            epoch = self.epoch
            added = ops.where(self.max_cells, ops.maximum(epoch, window),
                              ops.where(self.min_cells, ops.minimum(epoch, window), epoch + window))
            done = ops.depend(done, ops.assign(epoch, added))
        elif self.keeps_epoch:
            done = ops.depend(done, ops.assign_add(self.epoch, window))
        if self.window_is_step:
            if self.sync is not None:  # after the epoch level took this worker's own values
                done = ops.depend(done, ops.assign(window, step))
            return done
        return ops.depend(done, ops.assign(window, self.opened))

    def open_window(self):
        """Empties the window before a step's records, when it serves as the step level (graph-parseable)."""
        return ops.assign(self.window, self.opened)

    # ---- host side -------------------------------------------------------
    def _read(self, level: Parameter) -> Dict[str, float]:
        # weight > 0 means the name was logged at this level; a mean is a weighted sum.
        values, weights = level.asnumpy()
        self.host_reads += 1
        return self._values(values, weights)

    def _values(self, values: np.ndarray, weights: np.ndarray) -> Dict[str, float]:
        out = {}
        for i, opt in enumerate(self.options):
            if weights[i] > 0:
                out[opt.name] = float(values[i] / weights[i]) if opt.reduce_fx == "mean" else float(values[i])
        return out

    def read_step(self) -> Dict[str, float]:
        """Returns the last finished window's value of every name logged in it (a host sync)."""
        return self._read(self.window if self.window_is_step else self.step)

    def read_window(self) -> Dict[str, float]:
        """Returns the window's value of every name logged in it (a host sync).

        Between steps that is the open, unfinished window; when the window is the step level
        (`window_is_step`), the last step's.
        """
        return self._read(self.window)

    def read_epoch(self) -> Dict[str, float]:
        """Returns the epoch value of every name logged this epoch (a host sync, unless no name reports one).

        With several workers (`world_size`), names logged with `sync_dist=True` and `on_epoch` are reduced
        over them: every worker must call this at the same point.
        """
        if not self.keeps_epoch:
            return {}
        values, weights = self.epoch.asnumpy()
        self.host_reads += 1
        if self.world_size > 1 and any(o.sync_dist and o.on_epoch for o in self.options):
            from lightms.distributed.reduction import reduce_logged

            values, weights = reduce_logged(values, weights, [o.reduce_fx if o.sync_dist and o.on_epoch else None
                                                               for o in self.options])
        return self._values(values, weights)

    def read_history(self) -> List[Dict[str, float]]:
        """Returns the step values recorded by the last sunk chunk, one dict per history row (a host sync)."""
        history = self.history.asnumpy()
        self.host_reads += 1
        return [self._values(row[VALUE], row[WEIGHT]) for row in history]

    def state_dict(self, with_window: bool = True) -> Dict:
        """The logged names and the epoch level (reduced values, weights), for checkpoints.

        Args:
            with_window: Also the window level (inside an accumulation window; else it holds only the
                last step's values, which a resumed run must not add again).
        """
        state = {"options": [dataclasses.asdict(o) for o in self.options], "epoch": self.epoch.asnumpy().tolist()}
        if with_window:
            state["window"] = self.window.asnumpy().tolist()
        return state

    def load_state_dict(self, state: Dict) -> None:
        """Restores what `state_dict` returned (no compiled graph is unlinked).

        Raises:
            ValueError: If the checkpoint's run logged other names or options.
        """
        saved = [LogOptions(**o) for o in state["options"]]
        if saved != self.options:
            raise ValueError(f"the checkpoint's run logged {[o.name for o in saved]} in training_step with other "
                             f"options than this run's {[o.name for o in self.options]}; its epoch values cannot "
                             "continue.")
        ops.assign(self.epoch, Tensor(np.array(state["epoch"], np.float32)))
        ops.assign(self.window, Tensor(np.array(state["window"], np.float32)) if "window" in state else self.opened)

    def reset(self) -> None:
        """Clears the epoch level, if kept; called by the host at the start of an epoch.

        The steps clear the window and overwrite the step level themselves. Each host-side
        write is an op launch, so an epoch start writes only what it must.
        """
        if self.keeps_epoch:
            ops.assign(self.epoch, self.opened)

    def clear(self) -> None:
        """Clears every level; called at the start of a run (a failed run may have left a window open)."""
        for level in (self.window, self.step, self.epoch):
            ops.assign(level, self.opened)


class _StepSync(nn.Cell):
    """Reduces the columns of names logged with sync_dist and on_step of a (value, weight) level over the workers
    (graph-parseable).

    One AllGather of the level (CPU's AllReduce has only a sum): weighted sums and their weights
    add up to the global weighted mean, sums add up, max and min take the workers' extremes (their
    weight rows add up: they only say "logged"). Other columns keep this worker's values.
    """

    def __init__(self, options: List[LogOptions], count: int):
        super().__init__(auto_prefix=False)
        pad = [False] * (count - len(options))
        synced = [o.sync_dist and o.on_step for o in options]

        def mask(rows, fxs):  # the cells of `rows` in the columns of synced names reduced by one of `fxs`
            return rows & np.array([s and o.reduce_fx in fxs for s, o in zip(synced, options)] + pad)

        value_row, both_rows = np.array([[True], [False]]), np.array([[True], [True]])
        self.sum_cells = Tensor(mask(both_rows, ("mean", "sum")) | (~value_row & np.array(synced + pad)))
        self.max_cells, self.min_cells = Tensor(mask(value_row, ("max",))), Tensor(mask(value_row, ("min",)))
        self.has_extremes = any(s and o.reduce_fx in ("max", "min") for s, o in zip(synced, options))
        self.all_gather = ops.AllGather()  # made outside the graph, as MindSpore requires

    def construct(self, level):
        gathered = self.all_gather(ops.expand_dims(level, 0))  # (workers, 2, names)
        out = ops.where(self.sum_cells, gathered.sum(axis=0), level)
        if self.has_extremes:
            out = ops.where(self.max_cells, gathered.max(axis=0), ops.where(self.min_cells, gathered.min(axis=0), out))
        return out


__all__ = ["DeviceLogBuffers", "empty_level"]
