"""Data parallelism's reductions: the mean of each gradient over the workers (in the compiled step), and the
small host-side ones (logged values, stop flags, seeds, batch counts), all from one gather."""

import numpy as np

from lightms._mindspore import mindspore as ms  # noqa: F401  (quiets MindSpore's logs before it loads)
from mindspore import Tensor, ops

_hyper_map = ops.HyperMap()


def _scaled(factor, value):
    return value * ops.cast(factor, value.dtype)


def gradient_mean(world_size: int):
    """A graph-parseable function: gradients -> their mean over `world_size` workers (one AllReduce each).

    The primitive is made here, outside any graph, as MindSpore requires.
    """
    all_reduce = ops.AllReduce()  # a sum over the world group
    factor = Tensor(1.0 / world_size, ms.float32)

    def mean(grads):
        return _hyper_map(ops.partial(_scaled, factor), _hyper_map(all_reduce, grads))

    return mean


def gather(array) -> np.ndarray:
    """Every worker's `array`, stacked in rank order: shape (workers,) + its shape (one AllGather on the host;
    every worker must call it at the same point). CPU's AllReduce has only a sum, so sums, extremes and
    agreements are all taken from this."""
    return ops.AllGather()(Tensor(np.asarray(array)[None])).asnumpy()


def reduce_logged(values, weights, reduce_fxs):
    """Reduces logged epoch levels over the workers: sums (and the mean's weighted sums) add up, max and min
    take theirs; names with no reduction (None) keep this worker's values. Every worker must call it.

    Args:
        values, weights: One entry per logged name (a mean's value is its weighted sum).
        reduce_fxs: Each name's reduce_fx, or None.

    Returns:
        (values, weights) as float32 numpy arrays.
    """
    values, weights = np.array(values, np.float32), np.array(weights, np.float32)
    gathered = gather(np.stack([values, weights]))  # (workers, 2, names)
    summed = gathered.sum(axis=0)
    reduced = {"mean": summed[0], "sum": summed[0], "max": gathered[:, 0].max(axis=0),
               "min": gathered[:, 0].min(axis=0)}
    for i, fx in enumerate(reduce_fxs):
        if fx is not None:
            values[i], weights[i] = reduced[fx][i], summed[1][i]
    return values, weights


def any_worker(flags):
    """Whether any worker has each flag set (every worker must call it at the same point)."""
    return [bool(count > 0) for count in gather(np.array(flags, np.float32)).sum(axis=0)]


def agree_on_seed(seed: int) -> int:
    """Rank 0's `seed`, on every worker (for data pipelines that shuffle)."""
    return int(gather(np.array([seed], np.int64))[0, 0])


def agree_on_minimum(value: int) -> int:
    """The smallest of every worker's `value` (every worker must call it)."""
    return int(gather(np.array([value], np.int64)).min())


__all__ = ["agree_on_minimum", "agree_on_seed", "any_worker", "gather", "gradient_mean", "reduce_logged"]
