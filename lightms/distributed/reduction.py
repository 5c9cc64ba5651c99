"""The gradient stage of data parallelism: the mean of each gradient over the workers, in the compiled step."""

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


def level_reducers():
    """(AllReduce sum, AllGather) over the world group, for logged values reduced inside a graph (made outside it,
    as MindSpore requires)."""
    return ops.AllReduce(), ops.AllGather()


def reduce_logged(values, weights, reduce_fxs):
    """Reduces logged epoch levels over the workers: sums (and the mean's weighted sums) add up, max and min
    take theirs; names with no reduction (None) keep this worker's values. Every worker must call it.

    Args:
        values, weights: numpy arrays, one entry per logged name (a mean's value is its weighted sum; a
            max or min is one only where the name was logged, which is on every worker).
        reduce_fxs: Each name's reduce_fx, or None.

    Returns:
        (values, weights) as numpy arrays.
    """
    import numpy as np

    values, weights = np.array(values, np.float32), np.array(weights, np.float32)
    summed = ops.AllReduce()(Tensor(np.stack([values, weights]))).asnumpy()
    # AllReduce has only a sum on CPU: every worker's values, gathered, give the max and the min.
    gathered = ops.AllGather()(Tensor(values[None])).asnumpy()
    largest, smallest = gathered.max(axis=0), gathered.min(axis=0)
    for i, fx in enumerate(reduce_fxs):
        if fx is None:
            continue
        values[i] = {"mean": summed[0][i], "sum": summed[0][i], "max": largest[i], "min": smallest[i]}[fx]
        weights[i] = summed[1][i]
    return values, weights


def any_worker(flags):
    """Whether any worker has each flag set (every worker must call it at the same point)."""
    import numpy as np

    counts = ops.AllReduce()(Tensor(np.array(flags, np.float32))).asnumpy()
    return [bool(count > 0) for count in counts]


__all__ = ["any_worker", "gradient_mean", "level_reducers", "reduce_logged"]
