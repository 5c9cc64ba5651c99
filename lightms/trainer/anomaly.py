"""The non-finite check: the run's training losses and trainable parameters, one fused device check and one read."""

import math
import warnings

import numpy as np

from lightms._mindspore import mindspore as ms
from mindspore import ops

from lightms.engine.engine import compile_function


def check_nonfinite(trainer) -> None:
    """Checks that the run's losses and the trainable parameters are finite (one host sync); raises or warns once.

    The device sums the losses of the run (NaN and infinities carry through); the
    parameters are checked too, because a NaN in the input can reach the weights while
    the loss stays finite (MindSpore's ReLU maps NaN to 0). Called at epoch ends, or after
    every optimizer step under detect_anomaly, so the first check that fails names the
    epoch (or step) where it happened.
    """
    counters = trainer._counters
    if trainer._finite_check is None:
        check = _all_finite(counters, trainer.model.trainable_params())
        trainer._finite_check = compile_function(check, trainer.compile)
    finite = bool(trainer._finite_check().asnumpy())
    trainer._extra_host_reads += 1
    if finite or counters.nonfinite_warned:
        return
    loss_finite = math.isfinite(float(counters.loss_sum.asnumpy()))
    broken = [p.name for p in trainer.model.trainable_params() if not np.isfinite(p.asnumpy()).all()]
    state = trainer.state
    if trainer.detect_anomaly:
        what = ("the training loss was NaN or infinite" if not loss_finite else
                f"parameters {broken} became NaN or infinite while the training loss stayed finite (a NaN or "
                "infinity in the input data can do this: MindSpore's ReLU maps NaN to 0)")
        logged = trainer._metrics.read_train_step(state.global_step)
        raise FloatingPointError(
            f"Trainer(detect_anomaly=True): {what} at optimizer step {state.global_step} (epoch "
            f"{state.current_epoch}, batch {state.batch_idx}). Values logged at that step: {logged or 'none'}.")
    object.__setattr__(counters, "nonfinite_warned", True)
    what = (f"The training loss was NaN or infinite in epoch {state.current_epoch}" if not loss_finite else
            f"Parameters {broken} became NaN or infinite in epoch {state.current_epoch} while the training loss "
            "stayed finite (a NaN or infinity in the input data can do this: MindSpore's ReLU maps NaN to 0)")
    warnings.warn(f"{what} (lightms warns once per fit); training goes on. Trainer(detect_anomaly=True) stops "
                  "at the first such step.", stacklevel=2)


def _all_finite(counters, weights):
    """A step-like function: whether the run's loss sum and `weights` are all finite (graph-parseable)."""
    weights = tuple(weights)

    def check():
        return ops.logical_and(ops.isfinite(counters.loss_sum), ms.amp.all_finite(weights))

    return check


__all__ = ["check_nonfinite"]
