"""Chunks: the micro-batches of one host call, where an epoch is cut into them, and how a graph receives them.

`ChunkPlanner` plays the part of Keras' `EpochIterator` with steps-per-execution: it
reads an epoch's batches and yields `Chunk`s. A chunk collects consecutive
micro-batches of the same shapes, plans for each whether it ends its accumulation
window, and, when sinking, copies them into stacked buffers as they arrive. A chunk
ends when it is full (the sink length; one micro-batch without sinking), at the end
of the epoch, before a batch of other shapes, and after any optimizer step the host
must see (validation, a checkpoint, `max_steps`, a host-side scheduler, a callback's
`needs_host_at_step`). Windows may span chunks: the accumulators live on the device.
"""

import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Tuple, Union

import numpy as np

from lightms._mindspore import mindspore as ms
from mindspore import Tensor, ops

from lightms.trainer.data import Batch


def _leaves(data) -> list:
    if isinstance(data, dict):
        return list(data.values())
    if isinstance(data, (tuple, list)):
        return list(data)
    return [data]


def check_sinkable(data, where: str) -> None:
    """Raises if a batch's structure cannot be stacked for a sunk chunk.

    Raises:
        ValueError: If a batch nests containers (a tuple inside a tuple, ...).
    """
    for leaf in _leaves(data):
        if isinstance(leaf, (dict, tuple, list)):
            raise ValueError(
                f"{where}: Trainer(sink_size>1) needs batches that are a Tensor or a flat tuple, list or dict "
                f"of Tensors; this batch nests a {type(leaf).__name__}. Flatten the batch or use sink_size=1.")


class StackBuffers:
    """The stacked numpy buffers of sunk chunks, reused once nothing else holds them.

    A fresh buffer per chunk costs more than copying into it (the page faults of new
    memory; `benchmarks/README.md`). A set is reused only when no Tensor or view made from it is alive elsewhere (MindSpore
    keeps the last call's inputs; a hook may keep a batch it was given), which its arrays'
    reference counts tell: a batch kept by anyone never changes.

    Args:
        keep: Buffer sets to hold for reuse (two: one in MindSpore's hands, one being filled).
    """

    def __init__(self, keep: int = 2):
        self._keep = keep
        self._sets: List[List[np.ndarray]] = []
        self._unheld_refs: Optional[int] = None  # `_refs` of a set nothing else holds
        # The set handed out last: its chunk may still be filling it, which no reference count shows
        # (a chunk holds the list, not the arrays), so it is never handed out twice in a row.
        self._last: Optional[List[np.ndarray]] = None

    @staticmethod
    def _refs(buffers: List[np.ndarray]) -> int:
        return max(sys.getrefcount(buffer) for buffer in buffers)

    def take(self, leaves: List[np.ndarray], length: int) -> List[np.ndarray]:
        """A set of buffers of `length` rows shaped like `leaves`, free for writing."""
        shapes = [((length,) + leaf.shape, leaf.dtype) for leaf in leaves]
        unheld = [buffers for buffers in self._sets
                  if buffers is not self._last and self._refs(buffers) <= self._unheld_refs]
        for buffers in unheld:
            if [(b.shape, b.dtype) for b in buffers] == shapes:
                self._last = buffers
                return buffers
        buffers = self._last = [np.empty(shape, dtype) for shape, dtype in shapes]
        if self._unheld_refs is None:
            self._unheld_refs = self._refs(buffers)  # held by the list only, as a kept set is
        if unheld:  # an unheld set of other shapes (an epoch's smaller last batch) makes room
            self._sets = [kept for kept in self._sets if kept is not unheld[0]]
        if len(self._sets) < self._keep:
            self._sets.append(buffers)
        return buffers


@dataclass
class Chunk:
    """Consecutive micro-batches run by one host call, and which of them close a window.

    A sunk chunk copies each batch into its stacked buffers as the batch is added, before
    the next one is read: a loader may refill one array in place for every batch.

    Attributes:
        window: Micro-batches in the open window after the planned batches (at creation: before them).
        length: The stacked buffers' leading axis (the sink length); 0: no buffers (sink_size=1).
        pool: Where the stacked buffers come from (None when `length` is 0).
        batches: The micro-batches.
        sizes: For each, the size of the window it ends (itself included; an optimizer
            step), or 0 if it ends none.
        buffers: One stacked numpy buffer per leaf, rows past the added batches unset.
    """

    window: int
    length: int = 0
    pool: Optional[StackBuffers] = None
    batches: List[Batch] = field(default_factory=list)
    sizes: List[int] = field(default_factory=list)
    buffers: List[np.ndarray] = field(default_factory=list)

    def __post_init__(self):
        self._window_at_start = self.window

    @property
    def steps(self) -> int:
        """Optimizer steps the chunk takes."""
        return sum(1 for size in self.sizes if size)

    @property
    def shapes(self) -> Optional[Tuple]:
        """The leaf shapes of the chunk's batches, None while empty."""
        return self.batches[0].shapes if self.batches else None

    def accepts(self, batch: Batch) -> bool:
        """Whether `batch` has the shapes of the chunk's batches."""
        return not self.batches or batch.shapes == self.batches[0].shapes

    def add(self, batch: Batch, accumulate: int) -> bool:
        """Plans `batch` after the others (copying it into the buffers); returns whether it ends its window."""
        if self.length:
            self._copy_in(batch)
        self.window += 1
        closes = self.window == accumulate or batch.is_last
        self.batches.append(batch)
        self.sizes.append(self.window if closes else 0)
        if closes:
            self.window = 0
        return closes

    def _copy_in(self, batch: Batch) -> None:
        row = len(self.batches)
        leaves = [leaf if isinstance(leaf, np.ndarray) else leaf.asnumpy() for leaf in batch.leaves]
        if not self.buffers:
            # Rows past the real batches stay as they were: the step gets the real count and never reads them.
            self.buffers = self.pool.take(leaves, self.length)
        for buffer, leaf in zip(self.buffers, leaves):
            buffer[row] = leaf

    def hook_batches(self):
        """What batch-level hooks get as `batch`: the one batch's data, or when sunk a `SunkBatches`
        sequence of the chunk's batches (made of the stacked buffers' rows when read)."""
        if not self.length:
            return self.batches[0].data
        return SunkBatches(self.batches[0], self.buffers, len(self.batches))

    def cut_after_first(self) -> None:
        """Keeps only the first batch and makes it end its window (an epoch that stops early)."""
        self.batches, self.sizes, self.window = self.batches[:1], [self._window_at_start + 1], 0

    def device_inputs(self, length: int, plans: Dict[Tuple, Tuple[Tensor, Tensor]]) -> Tuple:
        """The inputs of the engine's sunk graph for this chunk: stacked batches, window sizes, count.

        Args:
            length: The stacked leading axis, at most `self.length`. A fixed axis keeps the
                graph's input shape, so a short chunk (cut for validation, a checkpoint, the
                end of an epoch) does not recompile it.
            plans: The (window sizes, count) Tensors of the plans seen so far in this run, by
                plan: most chunks of a run share one, and making Tensors costs host time.
        """
        plan = (tuple(self.sizes), length)
        tensors = plans.get(plan)
        if tensors is None:
            sizes = np.array(self.sizes + [0] * (length - len(self.batches)), np.float32)
            tensors = plans[plan] = (Tensor(sizes), Tensor(len(self.batches), ms.int32))
        # A leading slice is still contiguous: the Tensors share the buffers, no copy.
        stacked = self.batches[0].structured([Tensor.from_numpy(buffer[:length]) for buffer in self.buffers])
        return (ms.mutable(stacked) if isinstance(stacked, (dict, tuple, list)) else stacked,) + tensors


class SunkBatches(Sequence):
    """The batches of a sunk chunk, as the batch hooks get them: each made when read, of its rows of the
    stacked buffers (what the graph trains on, even when the loader refilled its arrays since).

    Building them all costs host time for every chunk, so nothing is built until a hook reads one.
    """

    def __init__(self, first: Batch, buffers: List[np.ndarray], count: int):
        # The arrays themselves (not the list the pool keeps): a hook that keeps this keeps them from reuse.
        self._first, self._buffers, self._count = first, tuple(buffers), count

    def __len__(self) -> int:
        return self._count

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(self._count))]
        if not -self._count <= index < self._count:
            raise IndexError(f"a chunk of {self._count} batches has no batch {index}")
        row = index % self._count
        return self._first.structured([Tensor.from_numpy(buffer[row]) for buffer in self._buffers])


# A sunk chunk is stacked on the host; "epoch" stops short of stacking more than this.
SINK_MEMORY_LIMIT = 1 << 30


def fit_in_memory(sink_length: int, batch_data, limit: int = SINK_MEMORY_LIMIT) -> int:
    """The sink length whose stacked chunk stays within `limit` bytes (at least 1).

    Args:
        sink_length: The requested micro-batches per host call.
        batch_data: One batch (its leaves' sizes give the bytes per micro-batch).
        limit: Bytes a stacked chunk may take.
    """
    per_batch = sum(leaf.nbytes for leaf in _flat_leaves(batch_data))
    return max(1, min(sink_length, limit // max(per_batch, 1)))


def _flat_leaves(data) -> list:
    leaves = []
    for leaf in _leaves(data):
        leaves += _flat_leaves(leaf) if isinstance(leaf, (dict, tuple, list)) else [leaf]
    return leaves


def resolve_sink_length(sink_size: Union[int, str], batches_per_epoch: Optional[int]) -> int:
    """Micro-batches per host call for `Trainer(sink_size=...)`.

    Raises:
        ValueError: For sink_size="epoch" on data without a length.
    """
    if sink_size == "epoch":
        if batches_per_epoch is None:
            raise ValueError('Trainer(sink_size="epoch") needs training data with a length (len() or '
                             "get_dataset_size()); pass an int sink_size instead.")
        return max(1, batches_per_epoch)
    if batches_per_epoch:  # a chunk never spans epochs: no longer than one
        return min(int(sink_size), batches_per_epoch)
    return int(sink_size)


# ---- how a graph receives batches ------------------------------------------------------------
@dataclass(frozen=True)
class BatchPassing:
    """How a step function receives a batch: as positional inputs, rebuilt into the batch inside the step.

    Separate Tensor arguments of a graph are variable inputs; a tuple, list or dict argument
    is a constant baked into the graph (recompiled for every batch) unless wrapped in
    `mindspore.mutable`, which costs a little per call. So a Tensor, or a flat tuple or list
    of Tensors (the usual `(x, y)`), goes in as separate Tensors; any other batch as one
    `mutable` input; an eager step gets the batch as it is.

    Attributes:
        pack: On the host: batch -> the step's positional inputs.
        unpack: Inside the step (graph-parseable): the positional inputs -> the batch.
    """

    pack: Callable
    unpack: Callable


def batch_passing(example, compiled: bool) -> BatchPassing:
    """The BatchPassing for batches structured like `example` (a batch whose leaves are Tensors)."""
    if not compiled or isinstance(example, Tensor):
        return BatchPassing(_alone, _first)
    if type(example) in (tuple, list) and all(isinstance(leaf, Tensor) for leaf in example):
        return BatchPassing(_itself, _as_tuple if type(example) is tuple else _as_list)
    return BatchPassing(_mutable_alone, _first)


def _alone(batch):
    return (batch,)


def _itself(batch):
    return batch


def _mutable_alone(batch):
    return (ms.mutable(batch),)


def _first(*inputs):
    return inputs[0]


def _as_tuple(*inputs):
    return inputs


def _as_list(*inputs):
    return list(inputs)


def row(stacked, i):
    """Row `i` (a non-negative 0-d int32 Tensor) of a stacked Tensor as one Gather (graph-parseable; `stacked[i]`
    would first map a negative index into range, three more kernels per loop iteration)."""
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


class ChunkPlanner:
    """Cuts each epoch's batches into chunks.

    Args:
        accumulate: Micro-batches per optimizer step.
        sink_length: Micro-batches per sunk host call (1: no sinking).
        host_needed: `(optimizer step, the batch that took the run there) -> bool`: whether the
            host must act right after that step (a chunk ends there).
        steps_done: Returns the run's optimizer steps so far (the host's count after the last chunk).
        where: The data's argument name, for messages.
        sink_size: The Trainer's `sink_size`, for messages.
    """

    def __init__(self, accumulate: int, sink_length: int, host_needed: Callable[[int, Batch], bool],
                 steps_done: Callable[[], int], where: str = "train_dataloaders", sink_size=1):
        self.accumulate, self.sink_length = accumulate, sink_length
        self.host_needed, self.steps_done = host_needed, steps_done
        self.where, self.sink_size = where, sink_size
        self._buffers = StackBuffers() if sink_length > 1 else None
        self._checked = sink_length == 1  # the first batch is checked for sinking once

    def _new(self, window: int) -> Chunk:
        if self.sink_length == 1:
            return Chunk(window)
        return Chunk(window, self.sink_length, self._buffers)

    def _check_first(self, batch: Batch) -> None:
        """Refuses an unsinkable batch; shortens the sink length, loudly, if a stacked chunk would not fit in memory."""
        self._checked = True
        check_sinkable(batch.data, self.where)
        fitting = fit_in_memory(self.sink_length, batch.data)
        if fitting < self.sink_length:
            warnings.warn(f"Trainer(sink_size={self.sink_size!r}): {self.sink_length} stacked batches would take more "
                          f"than {SINK_MEMORY_LIMIT >> 20} MiB of host memory; lightms sinks {fitting} per host call "
                          "instead.", stacklevel=5)
            self.sink_length = fitting

    def chunks(self, batches: Iterator[Batch], window: int) -> Iterator[Chunk]:
        """The chunks of one pass over `batches`, starting inside a window of `window` micro-batches.

        A chunk is yielded before the next batch is read (a loader may refill its arrays).
        """
        chunk = None
        for batch in batches:
            if not self._checked:
                self._check_first(batch)
            if chunk is None:
                chunk = self._new(window)
            elif not chunk.accepts(batch):  # a batch of another size: it starts a chunk of its own
                window = chunk.window
                yield chunk
                chunk = self._new(window)
            closes = chunk.add(batch, self.accumulate)
            if (len(chunk.batches) < self.sink_length and not batch.is_last
                    and not (closes and self.host_needed(self.steps_done() + chunk.steps, batch))):
                continue
            window = chunk.window
            yield chunk
            chunk = None
        if chunk is not None and chunk.batches:  # the data or a limit ended mid-chunk
            yield chunk

    def release(self) -> None:
        """Lets the stacked buffers go (up to 2 x 1 GiB): they are not kept past the run."""
        self._buffers = StackBuffers() if self.sink_length > 1 else None


__all__ = ["BatchPassing", "Chunk", "ChunkPlanner", "StackBuffers", "SunkBatches", "SINK_MEMORY_LIMIT", "batch_passing",
           "check_sinkable", "fit_in_memory", "resolve_sink_length", "row", "take_micro_batch"]
