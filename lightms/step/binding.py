"""Makes `self(x)` work inside compiled hooks.

MindSpore's graph parser turns `self` in a method into a namespace of the
cell's members, which cannot be called: `self(x)` fails with "The object is not
callable". A plain function whose first argument is the cell is parsed
differently: that argument is the cell itself, so calling it runs `construct`.
While a Trainer runs, each method the user wrote on their LightningCell subclass
(and each of LightningCell's, such as the default
predict_step) is shadowed on the instance by such a function, and removed afterwards.
"""

import dis
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
    # A function the user set on the instance itself stays: it is what the user wants called.
    names = [name for name in _user_method_names(type(module), base_class) if name not in module.__dict__]
    for name in names:
        object.__setattr__(module, name, _as_function(getattr(type(module), name), module))
    try:
        yield
    finally:
        for name in names:
            if getattr(module.__dict__.get(name), "__wrapped_method__", None) is not None:
                object.__delattr__(module, name)


class inside_step:  # noqa: N801  (used as a `with` statement, like a contextmanager function)
    """Points `self.log` at `log_target` and the counters at the device while a step hook runs.

    A class rather than a generator-based context manager: it is entered around every
    compiled step, where each Python call costs about ten times its isolated time.

    Args:
        module: The LightningCell.
        hook: The step hook's name ("training_step"), which sets `self.log`'s defaults.
        log_target: A LogRecorder (dry run) or DeviceLogBuffers (compiled or eager step).
    """

    __slots__ = ("module", "hook", "log_target")

    def __init__(self, module, hook: str, log_target):
        self.module, self.hook, self.log_target = module, hook, log_target

    def __enter__(self) -> None:
        module = self.module
        object.__setattr__(module, "_lightms_hook", self.hook)
        object.__setattr__(module, "_lightms_log_target", self.log_target)
        object.__setattr__(module, "_lightms_in_step", True)

    def __exit__(self, *exc_info) -> None:
        module = self.module
        object.__setattr__(module, "_lightms_in_step", False)
        object.__setattr__(module, "_lightms_hook", None)
        object.__setattr__(module, "_lightms_log_target", None)


def _code_objects(code) -> Iterator:
    yield code
    for const in code.co_consts:
        if inspect.iscode(const):
            yield from _code_objects(const)


def reads_argument(function: Callable, position: int) -> bool:
    """Whether `function` ever reads its argument at `position` (True when it cannot tell).

    Lets a compiled step skip feeding a value nobody reads: each input or counter
    update costs a kernel launch on the device.
    """
    code = getattr(function, "__code__", None)
    if code is None or position >= code.co_argcount or {"locals", "vars", "eval", "exec"} & set(code.co_names):
        return True
    name = code.co_varnames[position]
    return any(instruction.argval == name and instruction.opname.startswith(("LOAD_", "DELETE_"))
               for instruction in dis.get_instructions(code))


def reads_attribute(cls, stop_at, attribute: str) -> bool:
    """Whether code defined on `cls` or its bases mentions `attribute` (e.g. `self.global_step`).

    Searches every class in `cls`'s MRO other than `stop_at` and its own bases: subclasses
    of `stop_at` and mixins alike. Functions are unwrapped (`functools.wraps` decorators) and
    read with their wrappers; properties, static and class methods too. A class attribute
    that is callable but has no code to read (a callable object, a C function) counts as a
    mention: the answer is True when it cannot tell.
    """
    skipped = set(stop_at.__mro__)
    for klass in cls.__mro__:
        if klass in skipped:
            continue
        for value in vars(klass).values():
            if isinstance(value, (staticmethod, classmethod)):
                value = value.__func__
            functions = [value.fget, value.fset, value.fdel] if isinstance(value, property) else [value]
            for function in functions:
                if function is None or isinstance(function, type):
                    continue
                if not callable(function):
                    continue
                unwrapped = inspect.unwrap(function)
                for candidate in (function,) if unwrapped is function else (function, unwrapped):
                    code = getattr(candidate, "__code__", None)
                    if code is None or any(attribute in c.co_names or attribute in c.co_varnames
                                           for c in _code_objects(code)):
                        return True
    return False
