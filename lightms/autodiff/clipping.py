"""Gradient clipping, as the compiled step's clipping stage and `LightningCell.clip_gradients` use it."""

from lightms._mindspore import mindspore as ms  # noqa: F401  (quiets MindSpore's logs before it loads)
from mindspore import ops

ALGORITHMS = ("norm", "value")
_hyper_map = ops.HyperMap()


def _clip_value(limit, grad):
    return ops.clip_by_value(grad, -limit, limit)


def clip_by_norm(grads, max_norm: float):
    """Scales all gradients together so that their global L2 norm is at most `max_norm`."""
    return ops.clip_by_global_norm(grads, max_norm)


def clip_by_value(grads, limit: float):
    """Clamps every gradient element into [-limit, limit]."""
    return _hyper_map(ops.partial(_clip_value, limit), grads)


def check_clip_arguments(value, algorithm, where: str) -> None:
    """Raises a clear error for a bad clipping threshold or algorithm.

    Raises:
        ValueError: If `value` is not a positive number or `algorithm` is not "norm" or "value".
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{where}: gradient_clip_val must be a positive number, got {value!r}.")
    if algorithm not in ALGORITHMS:
        raise ValueError(f"{where}: gradient_clip_algorithm must be 'norm' or 'value', got {algorithm!r}.")


__all__ = ["ALGORITHMS", "check_clip_arguments", "clip_by_norm", "clip_by_value"]
