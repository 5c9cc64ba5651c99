"""The dry run: each step hook runs once eagerly on the first batch before it is compiled.

It records the hook's `self.log` calls (the names get slots in the device buffers)
and lets user mistakes surface as Python errors naming the hook, before MindSpore's
graph compiler sees the code.
"""

from typing import Any, Iterable, Tuple

from lightms._mindspore import mindspore as ms  # noqa: F401  (quiets MindSpore first)
from mindspore import Tensor, ops

from lightms.module.logging import LogRecorder
from lightms.module.cell import StepScope


def dry_run(module, hook: str, batch, batch_idx: int, restore: Iterable = ()) -> Tuple[LogRecorder, Any]:
    """Runs `module.<hook>(batch, batch_idx)` eagerly and records its `self.log` calls.

    Non-trainable parameters (BatchNorm statistics and the like) and `restore` are put
    back afterwards, so the dry run leaves no trace in the model.

    Args:
        module: The LightningCell.
        hook: The step hook's name.
        batch, batch_idx: The first batch and its index.
        restore: More Parameters the hook may change (under manual optimization, the
            weights and the optimizers' state, which its updates write).

    Returns:
        The recorder and what the hook returned.
    """
    recorder = LogRecorder(hook)
    kept, buffers = set(), []
    for p in [p for p in module.get_parameters() if not p.requires_grad] + list(restore):
        if id(p) not in kept:
            kept.add(id(p))
            buffers.append((p, p.asnumpy().copy()))
    try:
        object.__setattr__(module, "_lightms_dry_run", True)  # manual optimization's updates are skipped
        with StepScope(module, hook, recorder):
            output = getattr(module, hook)(batch, batch_idx)
    finally:
        object.__setattr__(module, "_lightms_dry_run", False)
        for param, value in buffers:
            ops.assign(param, Tensor(value))  # not set_data: that would unlink compiled graphs
    return recorder, output


def check_training_output(output, where: str, manual: bool = False) -> None:
    """Checks that training_step returned a scalar floating loss or a dict holding one.

    Args:
        output: What training_step returned in the dry run.
        where: "ClassName.training_step", for messages.
        manual: Manual optimization, where training_step may return None too (the loss is
            then for logging only, and need not be differentiable).

    Raises:
        ValueError: For None, a dict without "loss", or a non-scalar loss.
        TypeError: For a non-Tensor or non-floating loss.
    """
    if output is None and manual:
        return
    if output is None:
        raise ValueError(f"{where} returned None; it must return the loss (a scalar Tensor) or a dict with "
                         "key 'loss'. Skipping batches by returning None is not supported in compiled steps.")
    if isinstance(output, dict):
        if "loss" not in output:
            raise ValueError(f"{where} returned a dict without the key 'loss' (keys: {sorted(output)}).")
        output = output["loss"]
    if not isinstance(output, Tensor):
        raise TypeError(f"{where} must return a scalar Tensor (or a dict with 'loss'), got {type(output).__name__}.")
    if output.size != 1:
        raise ValueError(f"{where} must return a scalar loss, got a tensor of shape {tuple(output.shape)}; "
                         "reduce it (for example with .mean()).")
    if not output.is_floating_point() and not manual:
        raise TypeError(f"{where} returned a loss of dtype {output.dtype}; a floating-point loss is needed "
                        "to differentiate.")
