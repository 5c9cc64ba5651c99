"""Turns what the user passes as data into batches a compiled step can take.

Accepted: a batched `mindspore.dataset.Dataset` (each row a tuple of columns), or
any re-iterable object (a list, a generator-returning class) yielding batches.
A batch is a tuple, list or dict of numpy arrays or MindSpore Tensors, or a
single array. Every batch of a run must have the first batch's structure,
dtypes and per-sample shapes; only the leading (batch) dimension may differ.
"""

import itertools
import warnings
from typing import Any, Callable, Iterator, Optional, Tuple, Union

import numpy as np

from lightms._mindspore import mindspore  # noqa: F401  (quiets MindSpore's logs before it loads)
from mindspore import Tensor
from mindspore.common import dtype as mstype
from mindspore import dataset as msds


class Batch:
    """One batch ready for a step.

    Attributes:
        index: Position in the epoch (0-based).
        shapes: Its leaves' shapes, in order (batches of one sunk chunk share them).
        is_last: Whether it is the last batch of this pass over the data.
        leaves: Its leaves as they came, in the same order: the numpy array a Tensor of
            `data` shares memory with, or the Tensor itself. Sinking stacks these (reading
            a Tensor back with `asnumpy()` would cost host time between steps).
    """

    __slots__ = ("index", "shapes", "is_last", "leaves", "_data", "_container")

    def __init__(self, index: int, data: Any, shapes: Tuple[Tuple[int, ...], ...], is_last: bool,
                 leaves: Tuple = (), container: Optional[type] = None):
        """
        Args:
            data: The batch with every leaf a Tensor, or None: made from `leaves` when first
                read, in a `container` (a tuple or list) of Tensors sharing their memory.
        """
        self.index = index
        self.shapes = shapes
        self.is_last = is_last
        self.leaves = leaves
        self._data = data
        self._container = container

    @property
    def data(self) -> Any:
        """The batch with every leaf a Tensor.

        Made on first use by the fast path (`_FlatArrays`): a sunk chunk copies the leaves
        into its stacked buffers and never reads it, and making an `(x, y)` batch's two
        Tensors costs host time between steps.
        """
        if self._data is None:
            self._data = self._container([Tensor.from_numpy(leaf) for leaf in self.leaves])
        return self._data

    @property
    def size(self) -> int:
        """Its leading dimension (the number of samples)."""
        return self.shapes[0][0]

    def structured(self, leaves: list) -> Any:
        """`leaves`, one per leaf of this batch and in its order, in its structure (a dict, tuple, list or leaf)."""
        if self._data is None:
            return self._container(leaves)
        data = self._data
        if isinstance(data, dict):
            return dict(zip(data, leaves))
        if isinstance(data, (tuple, list)):
            return type(data)(leaves)
        return leaves[0]


def _leaf_name(path: Tuple) -> str:
    """A leaf's place in a batch, as the user would index it: `[0]`, `["image"]`, or "the batch itself"."""
    return "".join(f"[{key!r}]" for key in path) if path else "the batch itself"


def _refuse_non_numeric(dtype_name: str, kind: str, where: Callable[[], str], path: Tuple) -> None:
    raise TypeError(
        f"{where()}, leaf {_leaf_name(path)}: a {kind} of {dtype_name} cannot go into a compiled step (MindSpore "
        "computes on numbers only). Encode it as numbers in the data pipeline (token ids, labels), or drop the field.")


def _to_tensors(batch, where: Callable[[], str], signature: list, copy: bool = False, path: Tuple = ()):
    """Returns `batch` with every leaf a Tensor, appending what describes its structure to `signature`.

    A leaf's entry is ("leaf", MindSpore dtype, shape, the leaf as it came: a numpy array or a Tensor).

    One pass over the batch: every Python operation between two compiled steps costs
    several times what it costs in a tight loop (`benchmarks/README.md`), so conversion,
    the structure check's key and the size share one walk.
    `where()` names the batch in errors, `path` the leaf. With `copy`, numpy leaves are copied, not shared.

    Raises:
        TypeError: For a leaf of strings, bytes or Python objects, naming the batch and the leaf.
    """
    if isinstance(batch, np.ndarray):
        if batch.dtype.kind in "USOV":  # str, bytes, object, void: MindSpore would fail inside its compiler
            _refuse_non_numeric(f"dtype {batch.dtype}", "numpy array", where, path)
        if batch.dtype == np.float64:
            batch = batch.astype(np.float32)  # MindSpore layers are float32; float64 input is a numpy default
        elif copy:
            batch = np.array(batch)
        if batch.flags.c_contiguous:
            tensor = Tensor.from_numpy(batch)  # no copy
            source = batch  # the memory the Tensor shares
        else:
            tensor = source = Tensor(batch)
        # MindSpore's dtype, as for Tensor leaves: numpy and Tensor batches of one run compare equal.
        signature.append(("leaf", tensor.dtype, batch.shape, source))
        return tensor
    if isinstance(batch, Tensor):
        if batch.dtype == mstype.string:
            _refuse_non_numeric("strings", "Tensor", where, path)
        signature.append(("leaf", batch.dtype, batch.shape, batch))
        return batch
    if isinstance(batch, (dict, tuple, list)):
        if not batch:
            raise ValueError(f"{where()}: a batch is an empty {type(batch).__name__}.")
        if isinstance(batch, dict):
            signature.append(("dict", tuple(batch)))
            return {key: _to_tensors(value, where, signature, copy, path + (key,)) for key, value in batch.items()}
        if hasattr(batch, "_fields"):
            raise TypeError(
                f"{where()}: a batch is a namedtuple ({type(batch).__name__}); lightms takes tuples, lists and "
                "dicts (rebuilding a namedtuple inside a compiled step failed in MindSpore 2.10), so yield a tuple "
                "or a dict instead.")
        signature.append(("sequence", type(batch), len(batch)))
        return type(batch)(_to_tensors(value, where, signature, copy, path + (i,)) for i, value in enumerate(batch))
    raise TypeError(
        f"{where()}, leaf {_leaf_name(path)}: a batch must be a tuple, list or dict of numpy arrays or MindSpore "
        f"Tensors; found a {type(batch).__name__}."
    )


class _FlatArrays:
    """Converts the usual batch fast: a tuple or list of C-contiguous numpy arrays like the first batch's.

    Like means the same container type, length, dtypes, ranks and per-sample shapes.

    Between two compiled steps each Python operation costs several times what it costs in
    a tight loop, and the general conversion spends most of its time in checks this path
    makes once per run (a leaf's MindSpore dtype, the structure key). `convert` returns None for anything else, and the general
    path converts it or names what is wrong.

    Args:
        first: The run's first batch, as it came.
    """

    def __init__(self, first):
        self.kind = type(first)
        self.dtypes = tuple(leaf.dtype for leaf in first)
        self.ndims = tuple(leaf.ndim for leaf in first)
        self.tails = tuple(leaf.shape[1:] for leaf in first)

    @staticmethod
    def applies_to(first) -> bool:
        """Whether `first` (a batch that converted cleanly) is such a batch."""
        return type(first) in (tuple, list) and all(
            type(leaf) is np.ndarray and leaf.dtype != np.float64 and leaf.ndim > 0 for leaf in first)

    def convert(self, index: int, raw, is_last: bool) -> Optional["Batch"]:
        """The Batch of `raw`, or None when it is not a batch this path takes."""
        if type(raw) is not self.kind or len(raw) != len(self.dtypes):
            return None
        for leaf, dtype, ndim, tail in zip(raw, self.dtypes, self.ndims, self.tails):
            if (type(leaf) is not np.ndarray or (leaf.dtype is not dtype and leaf.dtype != dtype)
                    or leaf.ndim != ndim or leaf.shape[1:] != tail or not leaf.flags.c_contiguous):
                return None
        # Its Tensors are made when first read, sharing the arrays' memory as in `_to_tensors`.
        return Batch(index, None, tuple(leaf.shape for leaf in raw), is_last, tuple(raw), self.kind)


def _structure_key(signature: list) -> Tuple:
    """What must not change from batch to batch: the nesting, dtypes and per-sample shapes (not the batch size)."""
    return tuple(("leaf", entry[1], entry[2][1:]) if entry[0] == "leaf" else entry for entry in signature)


def structure_of(batch) -> Tuple:
    """Describes a batch's nesting, dtypes and per-sample shapes (not the batch dimension), for messages."""
    if isinstance(batch, dict):
        return ("dict", tuple((key, structure_of(value)) for key, value in batch.items()))
    if isinstance(batch, (tuple, list)):
        return (type(batch).__name__, tuple(structure_of(value) for value in batch))
    return ("tensor", str(batch.dtype), tuple(batch.shape[1:]))


def _count(limit: Optional[Union[int, float]], length: Optional[int], name: str) -> Optional[int]:
    """Turns a `limit_*_batches` value into a number of batches (None: all)."""
    if limit is None:
        return length
    if isinstance(limit, float):
        if length is None:
            if limit == 1.0:
                return None
            raise ValueError(f"{name}={limit} is a fraction, but the data has no length; pass an int.")
        return int(length * limit)
    return limit if length is None else min(limit, length)


class DataSource:
    """Iterates one loader as `Batch`es, checking that every batch has the first one's structure.

    Args:
        data: A batched `mindspore.dataset.Dataset` or a re-iterable object of batches.
        argument: The argument name the data came from, for error messages.
    """

    def __init__(self, data, argument: str):
        if data is None:
            raise ValueError(f"No data: {argument} is None.")
        if isinstance(data, (str, bytes)) or not (isinstance(data, msds.Dataset) or hasattr(data, "__iter__")):
            raise TypeError(
                f"{argument} must be a batched mindspore.dataset.Dataset or an iterable of batches, "
                f"got {type(data).__name__}."
            )
        if hasattr(data, "__next__") and not isinstance(data, msds.Dataset):
            raise TypeError(
                f"{argument} is an iterator, which can be read only once; pass a re-iterable object "
                "(a list, a Dataset, or a class whose __iter__ starts over)."
            )
        self.data = data
        self.argument = argument
        self.structure = None  # the first batch's structure key (`_structure_key`)
        self._first_structure = None  # ...and its readable form, for the error message
        self._flat_arrays = None  # the fast conversion, when the first batch is a tuple or list of arrays
        self._iterator = None  # the MindSpore dataset iterator, kept across passes
        self._epoch_unfinished = False
        self._resume_epochs = 0
        self._resume_batches = 0
        self._shard = (0, 1)  # (offset, stride): data parallelism split by batch reads every stride-th batch
        self._cap = None  # at most this many batches per pass: what every data-parallel worker has

    def shard(self, rank: int, world_size: int) -> None:
        """Makes each pass yield this worker's share of the data.

        A `mindspore.dataset` pipeline is read through MindSpore's `DistributedSampler`
        (`distributed.sharding`): each worker reads only its rows, padded so that all get the
        same number. One built with `num_shards`/`shard_id` is already this worker's share.
        Other data is split by batch: batches rank, rank + world_size, ..., `length // world_size`
        per worker (the last few that do not fill a round are dropped), and so is a pipeline
        MindSpore cannot shard exactly, with a warning saying why.

        Raises:
            ValueError: For data without a length (the workers could not agree on an epoch's end), or a
                pipeline built with other shards than this run's workers.
        """
        self._shard = (rank, world_size)
        if world_size == 1:
            return
        if isinstance(self.data, msds.Dataset):
            from lightms.distributed.sharding import shard_pipeline, user_shards

            built = user_shards(self.data)
            if built is not None:
                if built != (world_size, rank):
                    raise ValueError(f"{self.argument} was built with num_shards={built[0]}, shard_id={built[1]}, "
                                     f"but this is worker {rank} of {world_size}: build it with "
                                     f"num_shards=trainer.world_size, shard_id=trainer.global_rank, or unsharded "
                                     "(lightms then shards it).")
                self._shard = (0, 1)
                return
            sharded, reason = shard_pipeline(self.data, rank, world_size)
            if sharded is not None:
                self.data, self._shard = sharded, (0, 1)
                return
            warnings.warn(f"{self.argument}: MindSpore cannot shard this pipeline where it reads ({reason}), so "
                          f"every worker reads all of it and keeps every {world_size}th batch. Build the source "
                          "with num_shards=trainer.world_size, shard_id=trainer.global_rank to split the reading.",
                          stacklevel=3)
        elif self._base_length() is None:
            raise ValueError(f"{self.argument} has no length, so {world_size} data-parallel workers cannot split its "
                             "batches evenly; pass data with a len() (a list, a Dataset, a class with __len__).")

    def check_whole(self, world_size: int) -> None:
        """Evaluation data under data parallelism: every worker evaluates all of it (its values are then the whole
        data's without reduction), so a pipeline built with `num_shards` is refused.

        Raises:
            ValueError: For a sharded `mindspore.dataset` pipeline with several workers.
        """
        if world_size > 1 and isinstance(self.data, msds.Dataset):
            from lightms.distributed.sharding import user_shards

            built = user_shards(self.data)
            if built is not None:
                raise ValueError(f"{self.argument} was built with num_shards={built[0]}: lightms evaluates all the "
                                 "data on every data-parallel worker (so every worker reports the whole data's "
                                 "metrics); build it unsharded.")

    def limit_to(self, batches: int) -> None:
        """Makes each pass yield at most `batches` batches (the count every worker can take; the rest are dropped)."""
        self._cap = batches

    def resume_at(self, epochs_done: int, batches_done: int) -> None:
        """Makes the next pass continue where a checkpointed run stopped.

        A `mindspore.dataset` pipeline replays the shuffles of `epochs_done` epochs (the
        dataset seed must be the one the run had; `Trainer(seed=...)` sets it); then the
        first `batches_done` batches of the pass are read and skipped. Re-iterable Python
        data restarts each pass, so only the batches are skipped: exact when iterating
        it is deterministic.
        """
        self._resume_epochs, self._resume_batches = epochs_done, batches_done
        if batches_done and not isinstance(self.data, (msds.Dataset, list, tuple)):
            warnings.warn(
                f"Resuming in the middle of an epoch: lightms skips the first {batches_done} batches of "
                f"{self.argument} ({type(self.data).__name__}). This is exact only if iterating it yields the same "
                "batches in the same order every time; a source that shuffles on its own cannot be positioned.",
                stacklevel=3)

    def __len__(self) -> int:
        length = self.length()
        if length is None:
            raise TypeError(f"{self.argument} has no length.")
        return length

    def length(self) -> Optional[int]:
        """Returns the number of batches in one pass (this worker's share), or None if the data cannot tell."""
        length = self._base_length()
        if length is None:
            return None
        length //= self._shard[1]
        return length if self._cap is None else min(length, self._cap)

    def _base_length(self) -> Optional[int]:
        if isinstance(self.data, msds.Dataset):
            return int(self.data.get_dataset_size())
        try:
            return len(self.data)
        except TypeError:
            return None

    def batch_count(self, limit) -> Optional[int]:
        """Returns how many batches one pass yields under `limit` (None: unknown until read)."""
        return _count(limit, self.length(), self.argument)

    def _raw(self) -> Iterator:
        offset, stride = self._shard
        if stride == 1 and self._cap is None:
            return self._whole()
        return itertools.islice(self._whole(), offset, self.length() * stride, stride)

    def _whole(self) -> Iterator:
        if not isinstance(self.data, msds.Dataset):
            return iter(self.data)
        # One MindSpore iterator for the whole run: a new iterator per epoch would replay the
        # same shuffle order every epoch. Each pass reads one epoch of it; a pass that stopped
        # early (a limit, max_steps) is finished first so the next pass starts on an epoch boundary.
        if self._iterator is None:
            self._iterator = self.data.create_tuple_iterator(num_epochs=-1, do_copy=False)
        elif self._epoch_unfinished:
            for _ in self._iterator:
                pass
        self._epoch_unfinished = True
        return self._dataset_rows()

    def _dataset_rows(self) -> Iterator:
        for row in self._iterator:
            yield tuple(row)
        self._epoch_unfinished = False

    def batches(self, limit=None) -> Iterator[Batch]:
        """Returns an iterator over the batches of one pass, at most `limit` (an int, a fraction, or None for all).

        Not a generator itself: the loop resumes one generator per batch, not two.

        Raises:
            ValueError: If the data yields no batch, data with a length ends before it, or a
                batch's structure differs from the first.
            TypeError: If a batch is not made of arrays or Tensors.
        """
        count = self.batch_count(limit)
        if count == 0:
            return iter(())
        if self._resume_epochs and self._iterator is None and isinstance(self.data, msds.Dataset):
            self._iterator = self.data.create_tuple_iterator(num_epochs=-1, do_copy=False)
            for _ in range(self._resume_epochs):  # replay the shuffles of the finished epochs
                for _ in self._iterator:
                    pass
        iterator = self._raw()
        length = self.length()
        skip = self._resume_batches
        self._resume_epochs = self._resume_batches = 0
        ended = object()
        for index in range(skip):  # batches the resumed run has already trained on
            if next(iterator, ended) is ended:
                raise ValueError(f"{self.argument} ended after {index} batches; the checkpoint resumes after "
                                 f"{skip}. Resume with the data the run had.")
        if length is not None:
            return self._counted(iterator, skip, count, length)
        return self._read_ahead(iterator, skip, count)

    def _counted(self, iterator: Iterator, start: int, count: int, length: int) -> Iterator[Batch]:
        """Data with a length: the count says which batch is last, so nothing is read ahead.

        A loader may refill one buffer in place for every batch; reading ahead would
        change the batch about to be trained on (it shares that buffer's memory).
        """
        ended = object()
        for index in range(start, count):
            raw = next(iterator, ended)
            if raw is ended:
                told = "get_dataset_size()" if isinstance(self.data, msds.Dataset) else "len()"
                raise ValueError(
                    f"{self.argument} ended after {index} batches, but its {told} says {length}. lightms takes the "
                    "length at its word to know an epoch's last batch before training on it (an accumulation "
                    f"window closes there): make {told} match what iterating yields"
                    + (", or give the data no __len__." if told == "len()" else "."))
            yield self._prepare(index, raw, index + 1 == count)

    def _read_ahead(self, iterator: Iterator, start: int, count: Optional[int]) -> Iterator[Batch]:
        """Data without a length: reads one batch ahead to know the last, so each batch is copied first."""
        sentinel = object()
        index = start
        current = next(iterator, sentinel)
        if current is sentinel and index == 0:
            raise ValueError(f"{self.argument} yielded no batches: the dataset is empty.")
        while current is not sentinel and (count is None or index < count):
            # Copied before the next read, which may refill the memory it came in.
            batch = self._prepare(index, current, False, copy=True)
            upcoming = sentinel if count is not None and index + 1 >= count else next(iterator, sentinel)
            batch.is_last = upcoming is sentinel
            yield batch
            current = upcoming
            index += 1

    def _prepare(self, index: int, raw, is_last: bool, copy: bool = False) -> Batch:
        if self._flat_arrays is not None and not copy:
            batch = self._flat_arrays.convert(index, raw, is_last)
            if batch is not None:
                return batch

        def where() -> str:
            return f"{self.argument}, batch {index}"

        signature: list = []
        data = _to_tensors(raw, where, signature, copy)
        leaf_entries = [entry for entry in signature if entry[0] == "leaf"]
        shapes = tuple(tuple(entry[2]) for entry in leaf_entries)
        if not shapes[0]:
            raise ValueError(f"{where()}: batch elements must have a batch dimension; found a 0-d tensor.")
        key = _structure_key(signature)
        if self.structure is None:
            self.structure, self._first_structure = key, structure_of(data)
            if _FlatArrays.applies_to(raw):
                self._flat_arrays = _FlatArrays(raw)
        elif key != self.structure:
            raise ValueError(
                f"{where()}: the batch structure changed. Every batch must have the same nesting, dtypes and "
                f"per-sample shapes as the first.\n  first: {self._first_structure}\n  now:   {structure_of(data)}"
            )
        return Batch(index, data, shapes, is_last, tuple(entry[3] for entry in leaf_entries))


def _prepare_datamodule(entry: str, datamodule, loaders_given: bool, trainer) -> None:
    from lightms.module.datamodule import LightningDataModule

    if loaders_given:
        raise ValueError(f"Pass either a datamodule or dataloaders to Trainer.{entry}, not both.")
    if not isinstance(datamodule, LightningDataModule):
        raise TypeError(f"datamodule must be a lightms.LightningDataModule, got {type(datamodule).__name__}.")
    datamodule.trainer = trainer
    datamodule.prepare_data()
    datamodule.setup(entry)


def fit_sources(trainer, datamodule, train, val):
    """Returns the (train, val) DataSources of `fit`, from loaders or a datamodule (None where absent).

    Raises:
        ValueError: If both loaders and a datamodule are given.
    """
    if datamodule is not None:
        _prepare_datamodule("fit", datamodule, train is not None or val is not None, trainer)
        train, val = datamodule.train_dataloader(), datamodule.val_dataloader()
    train_source = DataSource(train, "train_dataloaders") if train is not None else None
    val_source = DataSource(val, "val_dataloaders") if val is not None else None
    return train_source, val_source


def eval_source(trainer, entry: str, datamodule, dataloaders) -> DataSource:
    """Returns the DataSource of `validate`, `test` or `predict`.

    Raises:
        ValueError: If no data, or both loaders and a datamodule, are given.
    """
    if datamodule is not None:
        _prepare_datamodule(entry, datamodule, dataloaders is not None, trainer)
        loader_method = {"validate": "val", "test": "test", "predict": "predict"}[entry] + "_dataloader"
        dataloaders = getattr(datamodule, loader_method)()
    if dataloaders is None:
        raise ValueError(f"Trainer.{entry} needs data: pass dataloaders or a datamodule.")
    return DataSource(dataloaders, "dataloaders")
