"""Each data-parallel worker's share of a `mindspore.dataset` pipeline, read through MindSpore's own sharding.

A pipeline `source -> map/shuffle/... -> batch` is split where it reads: a copy of it gets a
`DistributedSampler(num_shards=workers, shard_id=rank)` after the source's own sampler, so a
worker reads, decodes and batches only its rows (the user's pipeline object is not changed).
MindSpore's sampler deals the source's (shuffled) order out in turn and pads the last round
with the first rows, so every worker gets the same number of rows, as Lightning's
`DistributedSampler` does.

Where that cannot be done exactly (a source that is not random-access, an operation that counts
rows such as `take`/`skip`/`repeat`, several sources), the caller splits by batch instead.
"""

import copy
from typing import Optional, Tuple

from lightms._mindspore import mindspore  # noqa: F401  (quiets MindSpore's logs before it loads)
from mindspore import dataset as msds

# Operations that act row by row or batch by batch: a source sharded under them gives the
# worker's share of what the whole pipeline gives. Counting or combining operations (take, skip,
# repeat, zip, concat, filter, bucket_batch_by_length) would change meaning or length.
_ROW_WISE = ("BatchDataset", "MapDataset", "ShuffleDataset", "ProjectDataset", "RenameDataset")


def _chain(dataset) -> Tuple[list, Optional[str]]:
    """The pipeline's nodes from the top to its source, or why it is not a single chain of row-wise operations."""
    nodes = [dataset]
    while nodes[-1].children:
        node = nodes[-1]
        if len(node.children) != 1:
            return nodes, f"it combines {len(node.children)} pipelines ({type(node).__name__})"
        if type(node).__name__ not in _ROW_WISE:
            return nodes, f"it has a {type(node).__name__} operation, which counts rows"
        nodes.append(node.children[0])
    return nodes, None


def _shards_of(source) -> Optional[Tuple[int, int]]:
    """(num_shards, shard_id) of a source built sharded: through its arguments, or a DistributedSampler in its
    sampler chain (`sampler=DistributedSampler(...)` leaves its `num_shards` at 1)."""
    num_shards = getattr(source, "num_shards", None)
    if num_shards is not None and num_shards > 1:
        return int(num_shards), int(getattr(source, "shard_id", 0) or 0)
    sampler = getattr(source, "sampler", None)
    while sampler is not None:
        if isinstance(sampler, msds.DistributedSampler) and sampler.num_shards > 1:
            return int(sampler.num_shards), int(sampler.shard_id)
        sampler = getattr(sampler, "child_sampler", None)
    return None


def user_shards(dataset) -> Optional[Tuple[int, int]]:
    """(num_shards, shard_id) when a source of the pipeline was built sharded, else None."""
    pending = [dataset]
    while pending:
        node = pending.pop()
        pending.extend(node.children)
        shards = None if node.children else _shards_of(node)
        if shards is not None:
            return shards
    return None


def shard_pipeline(dataset, rank: int, world_size: int) -> Tuple[Optional[object], str]:
    """A copy of `dataset` that reads only worker `rank`'s rows, or (None, why not).

    Args:
        dataset: A `mindspore.dataset.Dataset` pipeline.
        rank, world_size: This worker and the number of workers.

    Returns:
        (the sharded copy, "") or (None, the reason it cannot be sharded at its source).
    """
    nodes, reason = _chain(dataset)
    if reason is not None:
        return None, reason
    source = nodes[-1]
    if not isinstance(source, msds.MappableDataset):
        return None, f"its source ({type(source).__name__}) is not random-access"
    if isinstance(source, msds.GeneratorDataset) and (
            not hasattr(source.source, "__getitem__") or getattr(source, "has_batch_sampler", False)):
        # MindSpore ignores a sampler added to a generator it can only iterate: every worker would read everything.
        return None, "its GeneratorDataset source has no __getitem__ (MindSpore cannot sample it)"
    sharded = copy.deepcopy(dataset)  # shares a GeneratorDataset's source; the user's pipeline stays whole
    copies, _ = _chain(sharded)
    try:
        copies[-1].add_sampler(msds.DistributedSampler(world_size, rank, shuffle=False))
    except RuntimeError as error:  # a source sampler that shuffles only partially cannot be sampled further
        return None, str(error)
    for node in copies:
        node.dataset_size = None  # sizes are cached on every node of the chain
    return sharded, ""


__all__ = ["shard_pipeline", "user_shards"]
