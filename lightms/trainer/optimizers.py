"""Reads what `configure_optimizers` returned into a typed configuration."""

from dataclasses import dataclass, field
from typing import Any, List

from lightms._mindspore import mindspore as ms  # noqa: F401
from mindspore import nn


def _optimizer_types():
    types = [nn.Optimizer]
    try:
        from mindspore.experimental.optim import Optimizer as ExperimentalOptimizer

        types.append(ExperimentalOptimizer)
    except ImportError:  # pragma: no cover - other MindSpore versions
        pass
    return tuple(types)


@dataclass
class OptimizerConfig:
    """The optimizer of a run and, later, its learning-rate schedulers.

    Attributes:
        optimizer: The MindSpore optimizer the compiled step calls.
        schedulers: Host-side scheduler configurations (not supported yet: empty).
    """

    optimizer: Any
    schedulers: List[Any] = field(default_factory=list)


def read_optimizer_config(returned, module_name: str) -> OptimizerConfig:
    """Checks the return value of `configure_optimizers`.

    Accepted: an optimizer, a list or tuple holding one optimizer, or a dict
    `{"optimizer": optimizer}`.

    Args:
        returned: What `configure_optimizers` returned.
        module_name: The module's class name, for messages.

    Returns:
        The configuration.

    Raises:
        TypeError: If no optimizer can be read from `returned`.
        ValueError: If several optimizers or a scheduler configuration are returned.
    """
    where = f"{module_name}.configure_optimizers()"
    if isinstance(returned, dict):
        extra = sorted(set(returned) - {"optimizer"})
        if "optimizer" not in returned:
            raise TypeError(f"{where} returned a dict without the key 'optimizer': keys {sorted(returned)}.")
        if extra:
            raise ValueError(f"{where} returned keys {extra}: learning-rate scheduler configs are not supported yet.")
        returned = returned["optimizer"]
    if isinstance(returned, (list, tuple)):
        if len(returned) != 1:
            raise ValueError(
                f"{where} returned {len(returned)} items; lightms trains with exactly one optimizer "
                "(several optimizers and schedulers come with manual optimization)."
            )
        returned = returned[0]
    if returned is None:
        raise TypeError(f"{where} returned None; return a mindspore.nn.Optimizer such as nn.Adam(self.trainable_params()).")
    if not isinstance(returned, _optimizer_types()):
        raise TypeError(f"{where} returned a {type(returned).__name__}, which is not a mindspore optimizer "
                        "(mindspore.nn.Optimizer or mindspore.experimental.optim.Optimizer).")
    return OptimizerConfig(returned)
