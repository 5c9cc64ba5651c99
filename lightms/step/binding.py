"""Makes `self(x)` work inside compiled hooks.

MindSpore's graph parser turns `self` in a method into a namespace of the
cell's members, which cannot be called: `self(x)` fails with "The object is not
callable". A plain function whose first argument is the cell is parsed
differently: that argument is the cell itself, so calling it runs `construct`.
While a Trainer runs, each method the user wrote on their LightningCell subclass
(and each of LightningCell's, such as the default
predict_step) is shadowed on the instance by such a function, and removed afterwards.
"""

import inspect
from contextlib import contextmanager
from typing import Callable, Iterator, List


def _user_method_names(cls, stop_at) -> List[str]:
    """Names of the plain methods defined on `cls` and its bases down to `stop_at` (included)."""
    names = []
    for klass in cls.__mro__:
        if not issubclass(klass, stop_at):
            continue
        for name, attr in vars(klass).items():
            if inspect.isfunction(attr) and not name.startswith("__") and name != "construct" and name not in names:
                names.append(name)
    return names


def _as_function(func: Callable, obj) -> Callable:
    # A closure, not a lambda or bound method: the graph parser handles closures over cells.
    def method(*args, **kwargs):
        return func(obj, *args, **kwargs)

    method.__name__ = func.__name__
    method.__wrapped_method__ = func
    return method


@contextmanager
def graph_callable_methods(module, base_class) -> Iterator[None]:
    """Shadows the user's methods of `module` with graph-friendly functions while active.

    Args:
        module: A LightningCell instance.
        base_class: LightningCell; methods of it and its subclasses are shadowed.
    """
    names = _user_method_names(type(module), base_class)
    for name in names:
        object.__setattr__(module, name, _as_function(getattr(type(module), name), module))
    try:
        yield
    finally:
        for name in names:
            if getattr(module.__dict__.get(name), "__wrapped_method__", None) is not None:
                object.__delattr__(module, name)


@contextmanager
def inside_step(module, hook: str, log_target) -> Iterator[None]:
    """Points `self.log` at `log_target` and the counters at the device while a step hook runs.

    Args:
        module: The LightningCell.
        hook: The step hook's name ("training_step"), which sets `self.log`'s defaults.
        log_target: A LogRecorder (dry run) or DeviceLogBuffers (compiled or eager step).
    """
    object.__setattr__(module, "_lightms_hook", hook)
    object.__setattr__(module, "_lightms_log_target", log_target)
    object.__setattr__(module, "_lightms_in_step", True)
    try:
        yield
    finally:
        object.__setattr__(module, "_lightms_in_step", False)
        object.__setattr__(module, "_lightms_hook", None)
        object.__setattr__(module, "_lightms_log_target", None)
