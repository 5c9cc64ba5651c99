"""What `self.log` writes to: option records, a dry-run recorder and device buffers.

A compiled step cannot append to a Python dict (graph mode does not replay
Python side effects), so logged values live in MindSpore `Parameter` vectors,
one slot per logged name, updated inside the graph. The names and their slots
are fixed before compilation by a dry run of the hook (`LogRecorder`). The host
reads the buffers only when somebody asks (a logger, the progress bar, a
callback): steps where nobody listens cost no device-to-host copy.
"""

import dataclasses
from dataclasses import dataclass
from typing import Dict, List, Optional

import numpy as np

from lightms._mindspore import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops

REDUCE_FXS = ("mean", "sum", "max", "min")
_INITIAL = {"mean": 0.0, "sum": 0.0, "max": -np.inf, "min": np.inf}


@dataclass(frozen=True)
class LogOptions:
    """The options one `self.log` call was made with, after defaults.

    Attributes:
        name: The metric name as the user wrote it.
        prog_bar: Show the value on the progress bar.
        logger: Send the value to the loggers.
        on_step: Report the value of every optimizer step.
        on_epoch: Report the reduced value over the epoch.
        reduce_fx: One of "mean", "sum", "max", "min".
        batch_size: Weight of each value in the mean; None means the size of the
            batch the step received.
        sync_dist: Reduce the step and epoch values over the data-parallel workers (with `reduce_fx`).
    """

    name: str
    prog_bar: bool
    logger: bool
    on_step: bool
    on_epoch: bool
    reduce_fx: str
    batch_size: Optional[int]
    sync_dist: bool = False

    def reported_names(self) -> Dict[str, str]:
        """Maps "step"/"epoch" to the name each value is reported under.

        Lightning's naming: with both on_step and on_epoch, the values are
        `name_step` and `name_epoch`; with one of them, just `name`.
        """
        if self.on_step and self.on_epoch:
            return {"step": f"{self.name}_step", "epoch": f"{self.name}_epoch"}
        if self.on_step:
            return {"step": self.name}
        if self.on_epoch:
            return {"epoch": self.name}
        return {}


# Hooks whose `self.log` calls report per optimizer step by default (Lightning's defaults).
STEP_LEVEL_HOOKS = frozenset({"training_step", "on_train_batch_start", "on_train_batch_end"})


def resolve_log_options(
    hook: str,
    name: str,
    prog_bar: bool,
    logger: bool,
    on_step: Optional[bool],
    on_epoch: Optional[bool],
    reduce_fx: str,
    batch_size: Optional[int],
    sync_dist: bool = False,
) -> LogOptions:
    """Checks the arguments of one `self.log` call and fills in Lightning's per-hook defaults.

    Args:
        hook: The hook the call was made from.
        name, prog_bar, logger, on_step, on_epoch, reduce_fx, batch_size: As given to `log`.

    Returns:
        The complete options.

    Raises:
        TypeError: If `name` is not a string or `batch_size` is not an int.
        ValueError: If `reduce_fx` is unknown, both on_step and on_epoch are False,
            or `batch_size` is not positive.
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"self.log in {hook}: the name must be a non-empty string, got {name!r}.")
    if reduce_fx not in REDUCE_FXS:
        raise ValueError(f"self.log({name!r}) in {hook}: reduce_fx must be one of {REDUCE_FXS}, got {reduce_fx!r}.")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int)):
        raise TypeError(f"self.log({name!r}) in {hook}: batch_size must be an int, got {batch_size!r}.")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"self.log({name!r}) in {hook}: batch_size must be >= 1, got {batch_size}.")
    step_level = hook in STEP_LEVEL_HOOKS
    on_step = step_level if on_step is None else bool(on_step)
    on_epoch = (not step_level) if on_epoch is None else bool(on_epoch)
    if not on_step and not on_epoch:
        raise ValueError(f"self.log({name!r}) in {hook}: on_step and on_epoch are both False, so nothing is logged.")
    return LogOptions(name, bool(prog_bar), bool(logger), on_step, on_epoch, reduce_fx, batch_size, bool(sync_dist))


def scalar_size(value) -> Optional[int]:
    """Returns the number of elements of a Tensor, array or number, or None if unknown."""
    if isinstance(value, (bool, int, float, np.floating, np.integer)):
        return 1
    size = getattr(value, "size", None)
    return int(size) if size is not None else None


class LogRecorder:
    """Collects the `self.log` calls of one hook during its eager dry run.

    Args:
        hook: The hook being recorded, for error messages ("training_step").
    """

    def __init__(self, hook: str):
        self.hook = hook
        self.options: Dict[str, LogOptions] = {}

    def log(self, hook, name, value, prog_bar, logger, on_step, on_epoch, reduce_fx, batch_size, sync_dist=False):
        """`LightningCell.log` during the dry run: checks and records the call."""
        self.record(resolve_log_options(hook, name, prog_bar, logger, on_step, on_epoch, reduce_fx, batch_size,
                                        sync_dist), value)
        return value

    def record(self, options: LogOptions, value) -> None:
        """Checks one logged value and remembers its options.

        Raises:
            ValueError: If the value is not a single number, or the same name is
                logged twice with different options.
            TypeError: If the value is not a number or Tensor.
        """
        size = scalar_size(value)
        if size is None:
            raise TypeError(
                f"self.log({options.name!r}, ...) in {self.hook}: expected a scalar Tensor or a "
                f"number, got {type(value).__name__}."
            )
        if size != 1:
            shape = tuple(getattr(value, "shape", ()))
            raise ValueError(
                f"self.log({options.name!r}, ...) in {self.hook}: expected a single value, got a "
                f"tensor of shape {shape}. Reduce it first (for example with .mean())."
            )
        known = self.options.get(options.name)
        if known is not None and known != options:
            raise ValueError(
                f"self.log({options.name!r}, ...) is called twice in {self.hook} with different "
                f"options: {known} and {options}."
            )
        self.options[options.name] = options


# Rows of each DeviceLogBuffers level: the reduced value and its weight. Means are kept as weighted sums.
VALUE, WEIGHT = 0, 1


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
            `sync_dist=True` are reduced over them inside the graph, as each window closes.
    """

    def __init__(self, options: List[LogOptions], single_batch_windows: bool = False, window_is_step: bool = False,
                 history_length: int = 0, world_size: int = 1):
        super().__init__(auto_prefix=False)
        self.options = list(options)
        self.index = {opt.name: i for i, opt in enumerate(self.options)}
        self.single_batch_windows = single_batch_windows
        self.window_is_step = window_is_step
        count = max(len(self.options), 1)  # a zero-width Parameter is awkward to update
        initial = np.zeros(count, np.float32)
        for i, opt in enumerate(self.options):
            initial[i] = _INITIAL[opt.reduce_fx]
        self._initial_level = np.stack([initial, np.zeros(count, np.float32)])
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

    def read_epoch(self, world_size: int = 1) -> Dict[str, float]:
        """Returns the epoch value of every name logged this epoch (a host sync, unless no name reports one).

        Args:
            world_size: Data-parallel workers: names logged with `sync_dist=True` are reduced over them
                (every worker must call this at the same point).
        """
        if not self.keeps_epoch:
            return {}
        values, weights = self.epoch.asnumpy()
        self.host_reads += 1
        if world_size > 1 and any(o.sync_dist for o in self.options):
            from lightms.distributed.reduction import reduce_logged

            values, weights = reduce_logged(values, weights, [o.reduce_fx if o.sync_dist else None
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

    One AllReduce (a sum) for every column: weighted sums and their weights add up to the global
    weighted mean; an AllGather more when a synced name reduces by max or min (CPU's AllReduce
    has only a sum). Other columns keep this worker's values.
    """

    def __init__(self, options: List[LogOptions], count: int):
        super().__init__(auto_prefix=False)
        from lightms.distributed.reduction import level_reducers

        pad = [False] * (count - len(options))
        synced = [o.sync_dist and o.on_step for o in options]
        value_row, both_rows = np.array([[True], [False]]), np.array([[True], [True]])
        summed = [s and o.reduce_fx in ("mean", "sum") for s, o in zip(synced, options)] + pad
        # Sums and means: both rows add up. Max and min: the weight row adds up (it only says "logged").
        self.sum_cells = Tensor((both_rows & np.array(summed)) | (~value_row & np.array(synced + pad)))
        self.max_cells = Tensor(value_row & np.array([s and o.reduce_fx == "max" for s, o in zip(synced, options)]
                                                     + pad))
        self.min_cells = Tensor(value_row & np.array([s and o.reduce_fx == "min" for s, o in zip(synced, options)]
                                                     + pad))
        self.has_extremes = any(s and o.reduce_fx in ("max", "min") for s, o in zip(synced, options))
        self.all_reduce, self.all_gather = level_reducers()

    def construct(self, level):
        out = ops.where(self.sum_cells, self.all_reduce(level), level)
        if self.has_extremes:
            gathered = self.all_gather(ops.expand_dims(level, 0))
            out = ops.where(self.max_cells, gathered.max(axis=0), ops.where(self.min_cells, gathered.min(axis=0), out))
        return out


def is_metric(value) -> bool:
    """Whether `value` is a `mindspore.train.Metric` (clear / update / eval)."""
    from mindspore.train import Metric

    return isinstance(value, Metric)


class HostLogs:
    """Where `self.log` writes when the hook runs on the host.

    That is every `on_*` hook, and the evaluation steps of a module that holds
    `mindspore.train.Metric`s. Values are read to Python floats at once and reduced
    like the device buffers; a logged Metric is evaluated (then cleared) at epoch end.

    With several data-parallel workers, a value logged with `sync_dist=True` is reduced over them
    as it is logged (every worker must log it at the same point): its step value and what it adds
    to the epoch are the workers' together.

    Args:
        world_size: Data-parallel workers.

    Attributes:
        current_batch_size: Weight of the values logged by the step running now.
    """

    def __init__(self, world_size: int = 1):
        self.world_size = world_size
        self.options: Dict[str, LogOptions] = {}
        self._step: Dict[str, float] = {}
        self._epoch: Dict[str, List[float]] = {}  # name -> [reduced value, weight]
        self._metrics: Dict[str, object] = {}  # logged Metrics not yet evaluated
        self._evaluated: Dict[str, float] = {}  # logged Metrics' values, once evaluated this epoch
        self.current_batch_size = 1

    def log(self, hook, name, value, prog_bar, logger, on_step, on_epoch, reduce_fx, batch_size, sync_dist=False):
        """`LightningCell.log` from a host hook."""
        if is_metric(value):
            # Lightning logs a metric object's compute() at epoch end; here, its eval().
            self.options[name] = resolve_log_options(hook, name, prog_bar, logger, False, True, "mean", None)
            self._metrics[name] = value
            return value
        options = resolve_log_options(hook, name, prog_bar, logger, on_step, on_epoch, reduce_fx, batch_size,
                                      sync_dist)
        LogRecorder(hook).record(options, value)  # same checks as inside steps
        number = float(value.asnumpy()) if hasattr(value, "asnumpy") else float(value)
        self.options[name] = options
        weight = float(batch_size or self.current_batch_size) if reduce_fx == "mean" else 1.0
        if options.sync_dist and self.world_size > 1:
            from lightms.distributed.reduction import reduce_logged

            values, weights = reduce_logged([number * weight if reduce_fx == "mean" else number], [weight],
                                            [reduce_fx])
            weight = float(weights[0])
            number = float(values[0]) / weight if reduce_fx == "mean" else float(values[0])
        self._step[name] = number
        acc = self._epoch.setdefault(name, [_INITIAL[reduce_fx], 0.0])
        if reduce_fx == "mean":
            acc[0] += number * weight
        elif reduce_fx == "sum":
            acc[0] += number
        elif reduce_fx == "max":
            acc[0] = max(acc[0], number)
        else:
            acc[0] = min(acc[0], number)
        acc[1] += weight
        return value

    def read_step(self) -> Dict[str, float]:
        """Returns the values logged since the last call and forgets them."""
        out, self._step = self._step, {}
        return out

    def read_epoch(self) -> Dict[str, float]:
        """Returns the epoch reduction of every name logged this epoch, and the value of each logged Metric.

        A Metric is evaluated (then cleared) the first time it is read after being logged; reading
        again returns the same values, plus what was logged since.
        """
        for name, metric in self._metrics.items():
            self._evaluated[name] = float(np.asarray(metric.eval()))
            metric.clear()
        self._metrics = {}
        values = {
            name: acc[0] / acc[1] if self.options[name].reduce_fx == "mean" else acc[0]
            for name, acc in self._epoch.items()
        }
        values.update(self._evaluated)
        return values

    def reset(self) -> None:
        """Forgets everything (start of an epoch)."""
        self._step, self._epoch, self._metrics, self._evaluated = {}, {}, {}, {}
