"""`ModuleBinding`: everything lightms puts on the user's module during a run, in one place.

While a Trainer runs a module, lightms sets on it: the trainer, graph-callable shadows
of its methods (so `self(x)` works inside compiled steps), the device counters, what
`self.log` writes to, the running hook, and, for evaluation hooks that update
`mindspore.train.Metric`s, a compiled `construct`. The binding sets each of them and
removes all of them when the run ends, also when it raises. It also keeps the
train/eval mode of every sub-cell the user chose (a frozen backbone in eval mode
stays so) and gives the modes back as they were before the run.

Why shadows: MindSpore's graph parser turns `self` in a method into a namespace of
the cell's members, which cannot be called, so `self(x)` fails with "The object is
not callable". A plain function whose first argument is the cell is parsed
differently: that argument is the cell itself, and calling it runs `construct`. Each
method the user wrote (and LightningCell's own) is shadowed on the instance by such a
function. `super()` inside a shadowed method is resolved by lightms (the parser's own
resolution needs a bound method), to the parent's method, shadowed alike.
"""

import inspect
import types
from typing import List, Tuple

from lightms._mindspore import mindspore  # noqa: F401  (quiets MindSpore's logs before it loads)
from mindspore import nn
from mindspore.graph._parse import parser as _ms_parser

from lightms.module.cell import StepScope


def _shadow(function, module):
    """A plain function calling `function(module, ...)`, which MindSpore's parser reads with `self` the cell.

    `function` is copied so that the copy can name its module: `super()` inside it is
    resolved through that (`_analyze_super`).
    """
    own = types.FunctionType(function.__code__, function.__globals__, function.__name__, function.__defaults__,
                             function.__closure__)
    own.__kwdefaults__ = function.__kwdefaults__
    own.__dict__.update(function.__dict__)
    own.__lightms_instance__ = module

    def method(*args, **kwargs):
        return own(module, *args, **kwargs)

    method.__name__, method.__qualname__ = function.__name__, function.__qualname__
    method.__lightms_shadow__ = function
    return method


class _Super:
    """What `super()` is inside a shadowed method: the parent's attributes, its methods shadowed too."""

    def __init__(self, start: type, module):
        self.__module__ = type(module).__module__  # the parser labels the object with it
        self._start, self._module = start, module

    def __getattr__(self, name):
        value = getattr(super(self._start, self._module), name)
        function = getattr(value, "__func__", None)
        if inspect.isfunction(function) and getattr(value, "__self__", None) is self._module:
            return _shadow(function, self._module)
        return value


# MindSpore's own (also when this module is imported again).
_ORIGINAL_ANALYZE_SUPER = getattr(_ms_parser.Parser.analyze_super, "__lightms_original__",
                                  _ms_parser.Parser.analyze_super)


def _analyze_super(parser, class_type_node, subclass_instance):
    """MindSpore's `Parser.analyze_super`, which also resolves `super()` in a lightms shadow.

    For a plain function MindSpore passes the function itself as the instance; a shadow's
    copy names its module. Everything else goes to MindSpore's own resolution.
    """
    module = getattr(subclass_instance, "__lightms_instance__", None)
    if module is None:
        return _ORIGINAL_ANALYZE_SUPER(parser, class_type_node, subclass_instance)
    if class_type_node is None:  # super(): the class whose body defines the method (its __class__ cell)
        cells = dict(zip(subclass_instance.__code__.co_freevars, subclass_instance.__closure__ or ()))
        start = cells["__class__"].cell_contents
    else:  # super(Class, self)
        name = getattr(class_type_node, "id", None) or getattr(class_type_node, "attr", None)
        start = next(klass for klass in type(module).__mro__ if klass.__name__ == name)
    return _Super(start, module)


# Installed when lightms loads: for everything but a lightms shadow it is MindSpore's own resolution, unchanged.
_analyze_super.__lightms_original__ = _ORIGINAL_ANALYZE_SUPER
_ms_parser.Parser.analyze_super = _analyze_super


def _methods_to_shadow(cls, base_class) -> List[str]:
    """Names of the plain methods a module of class `cls` has from `base_class` (LightningCell) and below.

    `construct` stays a method (calling the module runs it); an attribute that is not a function
    in the most derived class (`validation_step = None`, a property) is left alone.
    """
    names = []
    for klass in cls.__mro__:
        if not issubclass(klass, base_class):
            continue
        for name in vars(klass):
            if name.startswith("__") or name == "construct" or name in names:
                continue
            if inspect.isfunction(inspect.getattr_static(cls, name)):
                names.append(name)
    return names


def check_constructs(module: nn.Cell) -> None:
    """Refuses a `construct` whose first parameter is not named `self`, before MindSpore fails on it.

    MindSpore's graph compiler reads `construct` as a method and needs `self` by name
    (anything else fails with an unrelated C++ trace).

    Raises:
        TypeError: Naming the cell class and the parameter to rename.
    """
    for _, cell in module.cells_and_names():
        construct = inspect.getattr_static(type(cell), "construct", None)
        code = getattr(construct, "__code__", None)
        if code is None or not code.co_argcount:
            continue
        first = code.co_varnames[0]
        if first != "self":
            raise TypeError(f"{type(cell).__qualname__}.construct({first}, ...): MindSpore's graph compiler needs the "
                            f"first parameter of construct to be named self; rename {first!r} to 'self'.")


def set_on_instance(module, name: str) -> bool:
    """Whether the user set something for `name` on the module instance (not a lightms shadow)."""
    own = module.__dict__.get(name)
    return own is not None and getattr(own, "__lightms_shadow__", None) is None


def _modes(module) -> List[Tuple[nn.Cell, bool, str]]:
    """Each cell's (cell, training flag, phase), root first."""
    return [(cell, cell.training, cell.phase) for _, cell in module.cells_and_names()]


def _restore_modes(modes) -> None:
    for cell, training, phase in modes:
        cell.add_flags(training=training)  # this cell only (set_train would set its sub-cells too)
        cell.phase = phase


class ModuleBinding:
    """Sets what a run puts on a LightningCell on entering, and removes it on leaving (also on errors).

    Args:
        module: The LightningCell.
        trainer: The Trainer running it.
        base_class: LightningCell (methods of it and below are shadowed).
    """

    def __init__(self, module, trainer, base_class):
        self.module, self.trainer, self.base_class = module, trainer, base_class
        self._shadowed: List[str] = []
        self._modes_before = []
        self._construct_before = None
        self._replaced_construct = False

    def __enter__(self) -> "ModuleBinding":
        module = self.module
        check_constructs(module)
        self._modes_before = _modes(module)
        object.__setattr__(module, "_trainer", self.trainer)
        # A function the user set on the instance itself stays: it is what the user wants called.
        self._shadowed = [name for name in _methods_to_shadow(type(module), self.base_class)
                          if name not in module.__dict__]
        for name in self._shadowed:
            object.__setattr__(module, name, _shadow(getattr(type(module), name), module))
        return self

    def __exit__(self, *exc_info) -> None:
        module = self.module
        for name in self._shadowed:
            if getattr(module.__dict__.get(name), "__lightms_shadow__", None) is not None:
                object.__delattr__(module, name)
        self._shadowed = []
        if self._replaced_construct:
            if self._construct_before is None:
                module.__dict__.pop("construct", None)
            else:
                object.__setattr__(module, "construct", self._construct_before)
            self._replaced_construct = False
        for name in ("_lightms_log_target", "_lightms_hook", "_lightms_optimizers", "_lightms_grad_reduce"):
            object.__setattr__(module, name, None)
        object.__setattr__(module, "_lightms_schedulers", ())
        object.__setattr__(module, "_lightms_in_step", False)
        _restore_modes(self._modes_before)

    # ---- what the module's code sees ---------------------------------------------------
    def use_counters(self, counters) -> None:
        """Points `self.global_step` / `self.current_epoch` inside steps at these device counters."""
        object.__setattr__(self.module, "_lightms_counters", counters)

    def use_optimizers(self, optimizers, schedulers, world_size: int = 1) -> None:
        """What `self.optimizers()` and `self.lr_schedulers()` return during a fit; with several workers,
        `self.value_and_grad` averages the gradients over them."""
        object.__setattr__(self.module, "_lightms_optimizers", tuple(optimizers))
        object.__setattr__(self.module, "_lightms_schedulers", tuple(schedulers))
        if world_size > 1:
            from lightms.distributed.reduction import gradient_mean

            object.__setattr__(self.module, "_lightms_grad_reduce", gradient_mean(world_size))

    def silent_twin(self, counters):
        """A second view of the module whose `self.log` does nothing, for a pass whose logging would be wrong.

        DP-SGD's per-example pass runs training_step once per example under `vmap`, where
        the log buffers cannot be written; the step's ordinary forward logs instead. The twin
        shares the module's cells and Parameters (a shallow copy of its attributes) and has its
        own shadows, so MindSpore's parser, which reads `self.log`'s target once per function,
        sees a target that ignores the calls.
        """
        module = self.module
        twin = type(module).__new__(type(module))
        nn.Cell.__init__(twin)  # MindSpore's C++ side of a Cell; its Python attributes are the module's
        twin.__dict__.update(module.__dict__)
        for name in self._shadowed:
            object.__setattr__(twin, name, _shadow(getattr(type(module), name), twin))
        object.__setattr__(twin, "_lightms_log_target", _SilentLog())
        object.__setattr__(twin, "_lightms_hook", "training_step")
        object.__setattr__(twin, "_lightms_counters", counters)
        object.__setattr__(twin, "_lightms_in_step", True)
        return twin

    def inside(self, hook: str, log_target) -> "StepScope":
        """A context for one step hook: `self.log` writes to `log_target`, the counters read the device."""
        return StepScope(self.module, hook, log_target)

    def host_hook(self, hook: str, log_target) -> None:
        """Points `self.log` at `log_target` for an `on_*` hook about to run (None after it)."""
        object.__setattr__(self.module, "_lightms_hook", hook)
        object.__setattr__(self.module, "_lightms_log_target", log_target)

    def compile_construct(self, compile_fn) -> None:
        """Replaces the module's `construct` by `compile_fn(construct)` until the run ends (once)."""
        if self._replaced_construct:
            return
        module = self.module
        self._construct_before = module.__dict__.get("construct")  # mixed precision may have put one there
        object.__setattr__(module, "construct", compile_fn(module.construct))
        self._replaced_construct = True

    # ---- train / eval modes --------------------------------------------------------------
    def start_training(self) -> None:
        """Puts a module whose cells are all in eval mode (a new MindSpore Cell's default) in train mode.

        A module with some cell in train mode keeps its modes: sub-cells the user put in eval
        mode (a frozen backbone's BatchNorm) stay there.
        """
        if not any(cell.training for _, cell in self.module.cells_and_names()):
            self.module.set_train(True)

    def evaluating(self) -> "Evaluating":
        """A context: every cell in eval mode inside, each cell's own mode back after."""
        return Evaluating(self.module)


class _SilentLog(nn.Cell):
    """A log target that records nothing (graph-parseable)."""

    def log(self, hook, name, value, prog_bar, logger, on_step, on_epoch, reduce_fx, batch_size, sync_dist=False):
        return value


class Evaluating:
    """Every cell in eval mode while active; each cell's mode as it was afterwards."""

    def __init__(self, module):
        self.module = module
        self._modes: List = []

    def __enter__(self) -> None:
        self._modes = _modes(self.module)
        self.module.set_train(False)

    def __exit__(self, *exc_info) -> None:
        _restore_modes(self._modes)


__all__ = ["ModuleBinding", "StepScope", "check_constructs", "set_on_instance"]
