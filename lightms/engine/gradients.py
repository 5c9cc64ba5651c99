"""How a micro-batch's gradients are made and how an optimizer step applies them (graph-parseable builders).

`TrainEngine`'s graphs (`engine.py`) loop over micro-batches, accumulate windows and count
steps; what one micro-batch computes comes from here, chosen by the plan:

* `automatic_gradients`: lightms differentiates training_step's loss (or, under DP-SGD,
  each example's, clipped and summed), and the update runs the gradient stages (noise,
  clipping, frozen parameters kept) and the optimizer;
* `manual_gradients`: training_step computes and applies its own gradients.
"""

from typing import Tuple

from lightms._mindspore import mindspore as ms
from mindspore import ParameterTuple, Tensor, nn, ops

from lightms.autodiff.clipping import clip_by_norm, clip_by_value
from lightms.engine.plan import StepPlan


# ---- gradient stages --------------------------------------------------------------------------
class ClipGradNorm(nn.Cell):
    """Scales all gradients so their global L2 norm is at most `max_norm`."""

    def __init__(self, max_norm: float):
        super().__init__()
        self.max_norm = float(max_norm)

    def construct(self, grads):
        return clip_by_norm(grads, self.max_norm)


class ClipGradValue(nn.Cell):
    """Clamps every gradient element into [-clip_value, clip_value]."""

    def __init__(self, clip_value: float):
        super().__init__()
        self.clip_value = float(clip_value)

    def construct(self, grads):
        return clip_by_value(grads, self.clip_value)


def gradient_stages(plan: StepPlan) -> Tuple[nn.Cell, ...]:
    """The Cells that transform a window's averaged, unscaled gradients before the update, in order (clipping).

    The cross-worker mean runs before them, in the engine's update (it precedes unscaling);
    DP-SGD's noise runs before them too (`lightms.privacy.dpsgd.PrivacyStage`).
    """
    stages = []
    if plan.clip_val:
        stages.append(ClipGradNorm(plan.clip_val) if plan.clip_algorithm == "norm" else ClipGradValue(plan.clip_val))
    return tuple(stages)


def automatic_gradients(module, optimizer, plan: StepPlan, counters, training_step, one, loss_scaler,
               privacy, example_step, example_batch):
    """(gradients, apply) of automatic optimization: lightms differentiates the loss and steps the optimizer.

    Under DP-SGD (`privacy`, the `PrivacyStage`) the gradients are the sum of the micro-batch's
    clipped per-example gradients, and the stage adds the noise and divides before the update.
    """
    frozen = set(plan.frozen)
    weights = optimizer.parameters
    trained = ParameterTuple(p for p in weights if p.name not in frozen)
    if not len(trained):
        raise ValueError(f"{type(module).__name__}: every parameter of the optimizer has requires_grad=False, "
                         "so there is nothing to train.")
    # Frozen parameters and their optimizer slots ("moment1.<name>", ...) are put back after each update.
    kept = tuple(p for p in weights if p.name in frozen) + tuple(
        q for q in optimizer.get_parameters() if "." in q.name and q.name.split(".", 1)[1] in frozen)
    # Where each optimizer parameter's gradient comes from: its position in `trained`, or -1 (frozen: zero).
    positions = tuple(-1 if p.name in frozen else [q.name for q in trained].index(p.name) for p in weights)
    stages = gradient_stages(plan)
    has_outputs, output_keys = bool(plan.outputs), plan.output_keys

    def forward(batch, batch_idx):
        output = training_step(batch, batch_idx)
        loss = output["loss"] if isinstance(output, dict) else output
        if loss_scaler is not None:
            loss = loss_scaler.scale(loss)
        if has_outputs:
            return loss, tuple(output[key] for key in output_keys)
        return loss

    grad_fn = ms.value_and_grad(forward, None, trained, has_aux=has_outputs)
    if privacy is not None:
        from lightms.privacy.dpsgd import clipped_sum, per_example_gradients

        per_example = per_example_gradients(example_step, trained, example_batch)
        max_norm = privacy.max_grad_norm

        def dp_gradients(batch):
            """The sum of clipped per-example gradients, then the forward (its loss, logs and outputs). In
            the other order, a sunk graph lost the forward's logged values (MindSpore 2.10)."""
            grads = clipped_sum(per_example(batch, counters.batch_idx), max_norm)
            output = training_step(batch, counters.batch_idx)
            loss = ops.depend(output["loss"] if isinstance(output, dict) else output, grads)
            loss = ops.depend(loss, privacy.count(batch))
            extras = tuple(output[key] for key in output_keys) if has_outputs else ()
            return loss, extras, grads

    def gradients(batch):
        """Forward and backward of a micro-batch: (float32 loss, extra outputs or None, all gradients)."""
        if privacy is not None:
            loss, extras, grads = dp_gradients(batch)
        else:
            value, grads = grad_fn(batch, counters.batch_idx)
            loss, extras = (value[0], value[1]) if has_outputs else (value, ())
        loss = ops.depend(loss, ops.assign_add(counters.batch_idx, one))
        if kept:
            grads = tuple(ops.zeros_like(weights[i]) if position < 0 else grads[position]
                          for i, position in enumerate(positions))
        if loss_scaler is not None:
            loss = loss_scaler.unscale(loss)
        loss = ops.cast(loss, ms.float32)  # a half-precision loss is reported as float32
        return ops.depend(loss, ops.assign_add(counters.loss_sum, loss)), extras, grads

    def apply(grads, noise=None):
        """The stages and the update; frozen parameters and their optimizer state keep their values (weight
        decay and momentum would move them). `noise`: DP-SGD's standard normal row for the step."""
        if privacy is not None:
            grads = privacy(grads, noise)
        for stage in stages:
            grads = stage(grads)
        if not kept:
            return optimizer(grads)
        before = tuple(p + 0 for p in kept)  # read before the update writes them
        done = optimizer(grads)
        restored = tuple(ops.assign(p, ops.depend(value, done)) for p, value in zip(kept, before))
        return ops.depend(done, restored)

    return gradients, apply

def manual_gradients(plan: StepPlan, counters, training_step, one):
    """(gradients, apply) of manual optimization: training_step updates the weights itself; no gradients
    come out, and the update stage has nothing left to do."""
    has_outputs, output_keys, returns_loss = bool(plan.outputs), plan.output_keys, plan.returns_loss
    stepped_constant = Tensor(True, ms.bool_)

    def gradients(batch):
        output = training_step(batch, counters.batch_idx)
        if returns_loss:
            loss = ops.cast(output["loss"] if isinstance(output, dict) else output, ms.float32)
        else:  # None: the call's updates are kept only if something depends on it
            loss = ops.depend(Tensor(0.0, ms.float32), output)
        extras = tuple(output[key] for key in output_keys) if has_outputs else ()
        loss = ops.depend(loss, ops.assign_add(counters.batch_idx, one))
        return ops.depend(loss, ops.assign_add(counters.loss_sum, loss)), extras, ()

    def apply(grads, noise=None):
        return stepped_constant

    return gradients, apply


__all__ = ["ClipGradNorm", "ClipGradValue", "automatic_gradients", "gradient_stages", "manual_gradients"]
