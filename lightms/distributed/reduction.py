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


__all__ = ["gradient_mean"]
