"""Gradient transforms: the stage of the train step between `grad` and the optimizer.

Each transform is a Cell mapping a tuple of gradients to a tuple of gradients,
compiled into the step. The trainer builds the pipeline in order (average the
accumulation window, clip); later stages (all-reduce across workers, per-sample
clipping, noise, loss-scale unscaling) slot in here without touching the step.
"""

from typing import Sequence

from lightms._mindspore import mindspore as ms  # noqa: F401
from mindspore import nn, ops

_hyper_map = ops.HyperMap()


class ClipGradNorm(nn.Cell):
    """Scales all gradients so their global L2 norm is at most `max_norm`."""

    def __init__(self, max_norm: float):
        super().__init__()
        self.max_norm = float(max_norm)

    def construct(self, grads):
        return ops.clip_by_global_norm(grads, self.max_norm)


class ClipGradValue(nn.Cell):
    """Clamps every gradient element into [-clip_value, clip_value]."""

    def __init__(self, clip_value: float):
        super().__init__()
        self.clip_value = float(clip_value)

    def construct(self, grads):
        return _hyper_map(ops.partial(_clip_value, self.clip_value), grads)


class GradientPipeline(nn.Cell):
    """Applies gradient transforms in order.

    Args:
        stages: Cells mapping a gradient tuple to a gradient tuple.
    """

    def __init__(self, stages: Sequence[nn.Cell]):
        super().__init__()
        self.stages = nn.CellList(list(stages))
        self.empty = len(stages) == 0

    def construct(self, grads):
        if self.empty:
            return grads
        for stage in self.stages:
            grads = stage(grads)
        return grads


def _clip_value(limit, grad):
    return ops.clip_by_value(grad, -limit, limit)
