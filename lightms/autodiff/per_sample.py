"""`per_sample_grads`: each example's own gradient, for a whole batch in one vectorised call.

Per-example gradients are what differential privacy (clip each example, then add noise),
gradient-norm diagnostics and influence estimates need. A Python loop over the batch
calls the gradient once per example; `mindspore.vmap` over `mindspore.grad` computes all
of them in one (compiled) program instead.
"""

from typing import Callable, Tuple, Union

from lightms._mindspore import mindspore as ms  # noqa: F401  (quiet import first)
from mindspore import Parameter, ParameterTuple, Tensor, nn

Weights = Union[nn.Cell, ParameterTuple, list, tuple]


def _as_parameter_tuple(weights: Weights) -> ParameterTuple:
    """The weights as a ParameterTuple, checked in Python (MindSpore's own errors come later, from a trace)."""
    if isinstance(weights, nn.Cell):
        weights = weights.trainable_params()
    elif isinstance(weights, Parameter) or not isinstance(weights, (list, tuple)):
        # ParameterTuple is a tuple; a lone Parameter is a Tensor, which would iterate over its rows.
        raise TypeError("weights must be a Cell, a ParameterTuple or a list or tuple of Parameters, "
                        f"not {type(weights).__name__}")
    weights = tuple(weights)
    if not weights:
        raise ValueError("per_sample_grads needs at least one weight (a Cell with no trainable parameters, "
                         "or an empty list, was given)")
    for position, weight in enumerate(weights):
        if not isinstance(weight, Parameter):
            raise TypeError(f"weights[{position}] is a {type(weight).__name__}, not a mindspore.Parameter: "
                            "gradients are taken with respect to Parameters only")
    return weights if isinstance(weights, ParameterTuple) else ParameterTuple(weights)


def per_sample_grads(fn: Callable[..., Tensor], weights: Weights) -> Callable[..., Tuple[Tensor, ...]]:
    """Makes a function that returns every example's gradient of `fn` with respect to `weights`.

    `fn` is written for one example; the returned function takes the same inputs with a
    leading batch axis (axis 0 of every input) and runs `fn`'s gradient on each example,
    vectorised by `mindspore.vmap` rather than looped in Python.

    Build the function outside compiled code (in `__init__`, or before a `mindspore.jit`
    function is defined): the checks here are Python, which MindSpore's graph parser
    cannot run. The function it returns can be called eagerly or inside a compiled graph
    (a `mindspore.jit` function, a Cell in GRAPH_MODE, a lightms `training_step`).

    Example::

        net = nn.Dense(6, 1)

        def loss_one(x, y):  # x: [6], y: [1]
            return ((net(x.expand_dims(0)) - y) ** 2).mean()

        grads_of = per_sample_grads(loss_one, net)
        w_grads, b_grads = grads_of(x_batch, y_batch)  # x_batch: [n, 6] -> w_grads: [n, 1, 6]

    Args:
        fn: Computes one example's scalar loss from that example's inputs (no batch axis).
            Every argument is mapped over axis 0, so pass each tensor as its own argument
            and only per-example tensors. (MindSpore sums a non-scalar loss before
            differentiating it.)
        weights: The Parameters to differentiate: a list or tuple of Parameters, a
            ParameterTuple, or a Cell (its `trainable_params()`).

    Returns:
        A function of the batched inputs returning a tuple with one Tensor per weight, in
        the order of `weights`; each has shape `(batch,) + weight.shape` and holds, at index
        i, the gradient of `fn` on example i.

    Raises:
        TypeError: If `fn` is not callable, `weights` is not one of the accepted types, or
            one of the weights is not a `mindspore.Parameter`.
        ValueError: If there are no weights.
    """
    if not callable(fn):
        raise TypeError(f"fn must be callable (one example's loss), not {type(fn).__name__}")
    parameters = _as_parameter_tuple(weights)
    # grad_position=None: gradients for the weights only, not for the inputs.
    one_example = ms.grad(fn, grad_position=None, weights=parameters)
    # in_axes=0 for every input; out_axes=0 puts the batch axis first on every weight's gradient.
    return ms.vmap(one_example, in_axes=0, out_axes=0)


__all__ = ["per_sample_grads"]
