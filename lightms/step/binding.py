"""Makes `self(x)` work inside compiled hooks.

MindSpore's graph parser turns `self` in a method into a namespace of the
cell's members, which cannot be called: `self(x)` fails with "The object is not
callable". A plain function whose first argument is the cell is parsed
differently: that argument is the cell itself, so calling it runs `construct`.
While a Trainer runs, each method the user wrote on their LightningCell subclass
(and each of LightningCell's, such as the default
predict_step) is shadowed on the instance by such a function, and removed afterwards.

It also reads the user's methods, so that a compiled step does only what they need:
whether they read an argument or attribute, and whether their `self.log` calls run on
every step.
"""

import ast
import dis
import inspect
import textwrap
from contextlib import contextmanager
from typing import Callable, Dict, Iterator, List, Optional, Tuple

from lightms._mindspore import mindspore  # noqa: F401  (quiets MindSpore's logs before it loads)
from mindspore import Tensor, nn
from mindspore.ops import Primitive


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
    unsure = {"locals", "vars", "eval", "exec", "_getframe", "currentframe", "f_locals"}  # frame introspection
    if code is None or position >= code.co_argcount or unsure & set(code.co_names):
        return True
    name = code.co_varnames[position]
    return any(instruction.argval == name and instruction.opname.startswith(("LOAD_", "DELETE_"))
               for instruction in dis.get_instructions(code))


def _class_attributes(cls, stop_at) -> Iterator[Tuple[str, object]]:
    """(name, value) of what the classes in `cls`'s MRO other than `stop_at` and its bases define.

    Subclasses of `stop_at` and mixins alike, most derived first; static and class methods
    as their functions.
    """
    skipped = set(stop_at.__mro__)
    for klass in cls.__mro__:
        if klass in skipped:
            continue
        for name, value in vars(klass).items():
            yield name, value.__func__ if isinstance(value, (staticmethod, classmethod)) else value


def _user_methods(cls, stop_at) -> Dict[str, object]:
    """Name -> the most derived definition, of what `_class_attributes` yields."""
    methods: Dict[str, object] = {}
    for name, value in _class_attributes(cls, stop_at):
        methods.setdefault(name, value)
    return methods


def reads_attribute(cls, stop_at, attribute: str) -> bool:
    """Whether code defined on `cls` or its bases mentions `attribute` (e.g. `self.global_step`).

    Searches every class in `cls`'s MRO other than `stop_at` and its own bases: subclasses
    of `stop_at` and mixins alike. Functions are unwrapped (`functools.wraps` decorators) and
    read with their wrappers; properties, static and class methods too. A class attribute
    that is callable but has no code to read (a callable object, a C function) counts as a
    mention: the answer is True when it cannot tell.
    """
    for _, value in _class_attributes(cls, stop_at):
        functions = [value.fget, value.fset, value.fdel] if isinstance(value, property) else [value]
        for function in functions:
            if function is None or isinstance(function, type) or not callable(function):
                continue
            unwrapped = inspect.unwrap(function)
            for candidate in (function,) if unwrapped is function else (function, unwrapped):
                code = getattr(candidate, "__code__", None)
                if code is None or any(attribute in c.co_names or attribute in c.co_varnames
                                       for c in _code_objects(code)):
                    return True
    return False


# Statements and expressions under which a call may not run every time the method runs.
_CONDITIONAL = tuple(getattr(ast, name) for name in (
    "If", "For", "AsyncFor", "While", "With", "AsyncWith", "Try", "TryStar", "Match", "IfExp", "BoolOp",
    "ListComp", "SetComp", "DictComp", "GeneratorExp", "Assert", "Lambda", "FunctionDef",
    "AsyncFunctionDef", "ClassDef") if hasattr(ast, name))
_LOG_METHODS = ("log", "log_dict")


def _fixed_dict(call: ast.Call) -> bool:
    """Whether a `log_dict` call logs a dict literal without `**` (the same names every time)."""
    return len(call.args) >= 1 and isinstance(call.args[0], ast.Dict) and None not in call.args[0].keys


class _SelfUses:
    """What one method does with `self`.

    Attributes:
        calls: The `self.<name>(...)` calls, each with whether it sits under a condition or loop
            (a `log_dict` of anything but a dict literal counts as conditional: its names may vary).
        call_roots: Names `<name>` of calls `self.<name>.<...>(...)` (a sub-cell's, say).
        hidden: Whether code elsewhere may log for it, out of sight: `self.log` not called on the
            spot, `self` handed to a function, or `super()`.
        early_return: A return under a condition (what follows it may not run).
    """

    def __init__(self):
        self.calls: List[Tuple[str, bool]] = []
        self.call_roots: List[str] = []
        self.hidden = False
        self.early_return = False


def _method_source(function) -> Optional[Tuple[ast.AST, str]]:
    """(the parsed `def`, the name of its first argument: `self`) of a method, or None without source."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(function)))
    except (OSError, TypeError, SyntaxError):
        return None
    definition = tree.body[0] if tree.body else None
    if not isinstance(definition, (ast.FunctionDef, ast.AsyncFunctionDef)) or not definition.args.args:
        return None
    return definition, definition.args.args[0].arg


def _self_uses(function) -> Optional[_SelfUses]:
    """Reads a method's source (None when there is none to read)."""
    source = _method_source(function)
    if source is None:
        return None
    definition, me = source
    nodes = list(ast.walk(definition))
    calls = {id(node.func): node for node in nodes if isinstance(node, ast.Call)}  # by the id of what is called
    in_sight = set(calls) | {id(node.value) for node in nodes if isinstance(node, ast.Attribute)}
    uses = _SelfUses()
    for node in nodes:  # self.<name>.<...>(...): the root <name>
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            root = node.func.value
            while isinstance(root, ast.Attribute) and not (isinstance(root.value, ast.Name) and root.value.id == me):
                root = root.value
            if isinstance(root, ast.Attribute):
                uses.call_roots.append(root.attr)

    def walk(node, conditional: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Return) and conditional:
                uses.early_return = True
            if isinstance(child, ast.Attribute) and isinstance(child.value, ast.Name) and child.value.id == me:
                if id(child) in calls:
                    varies = child.attr == "log_dict" and not _fixed_dict(calls[id(child)])
                    uses.calls.append((child.attr, conditional or varies))
                elif child.attr in _LOG_METHODS:
                    uses.hidden = True
            elif isinstance(child, ast.Name) and child.id == me and id(child) not in in_sight:
                uses.hidden = True  # `self` passed on: `self(x)` and `self.attr` stay in sight
            elif isinstance(child, ast.Name) and child.id == "super" and id(child) in calls:
                uses.hidden = True
            chained = isinstance(child, ast.Compare) and len(child.ops) > 1  # `a < b < c` may stop early
            walk(child, conditional or chained or isinstance(child, _CONDITIONAL))

    walk(definition, False)
    return uses


def logs_unconditionally(module, stop_at, hook: str = "training_step") -> bool:
    """Whether every `self.log` / `self.log_dict` that `hook` reaches runs each time the hook runs.

    Reads the source of `hook` and of the methods of `module`'s class (below `stop_at`) that
    it calls, directly or through each other, and `construct`. A log call, or a call of a
    method that logs, under an `if`, a loop, a `with`, a `try`, a conditional expression or
    a nested function, or after a return under a condition, counts as conditional; so does
    a condition on a Python value, which the graph compiler would fold.

    Args:
        module: The LightningCell instance.
        stop_at: LightningCell: its own methods (`log` itself) are not read.
        hook: The step hook to start from.

    Returns:
        True only when sure. False also for a method without readable source, a decorated one,
        one set on the instance, `self.log` used other than called, `self` handed to a function,
        `super()`, a call of anything on `self` but its methods, sub-cells, Parameters and
        primitives (a `functools.partial`, a helper object holding the module, ...).
    """
    methods = _user_methods(type(module), stop_at)
    if not inspect.isfunction(methods.get(hook)):
        return False
    parsed: Dict[str, _SelfUses] = {}
    pending = [hook] + (["construct"] if "construct" in methods else [])
    while pending:
        name = pending.pop()
        if name in parsed:
            continue
        function = methods[name]
        if set_on_instance(module, name) or not inspect.isfunction(function) or hasattr(function, "__wrapped__"):
            return False  # no source of its own to read: set on the instance, decorated, a callable object, ...
        uses = _self_uses(function)
        if uses is None or uses.hidden:
            return False
        if not all(_cannot_log(module, stop_at, root) for root in uses.call_roots):
            return False
        for called, _ in uses.calls:
            if called in methods:
                pending.append(called)
            elif called not in _LOG_METHODS and not _cannot_log(module, stop_at, called):
                return False
        parsed[name] = uses
    logging = set(_LOG_METHODS)
    grown = True
    while grown:  # methods that log, directly or through methods they call
        before = len(logging)
        logging.update(name for name, uses in parsed.items() if any(called in logging for called, _ in uses.calls))
        grown = len(logging) != before
    for uses in parsed.values():
        logs_here = [conditional for called, conditional in uses.calls if called in logging]
        if any(logs_here) or (logs_here and uses.early_return):
            return False
    return True


# Where a dict can gain or lose keys when the step runs. A condition on a Python value is folded by the
# graph compiler and harmless, but cannot be told apart here: this is read only once a graph has failed.
_BRANCHES = tuple(getattr(ast, name) for name in ("If", "IfExp", "While", "BoolOp", "Try", "TryStar", "Match")
                  if hasattr(ast, name))
_DICT_CHANGES = ("update", "setdefault", "pop", "popitem", "clear")


def _dict_keys(node) -> Optional[frozenset]:
    """The keys of a dict literal of constant keys, else None."""
    if isinstance(node, ast.Dict) and all(isinstance(key, ast.Constant) for key in node.keys):
        return frozenset(key.value for key in node.keys)
    return None


class _DictLogReading:
    """What one method does with the dicts it logs: read from its source by `read`.

    Attributes:
        changed: Names whose dict gains or loses keys under a condition: a key set or deleted
            there, `update`/`pop`/... there, the name bound again there, or bound to
            `{...} if c else {...}` with other keys.
        logged: (name, line in its file) of each `self.log_dict(name)`.
        calls_self: Whether the method calls `self(...)`, which runs `construct`.
    """

    def __init__(self):
        self.changed = set()
        self.logged: List[Tuple[str, int]] = []
        self.calls_self = False

    @classmethod
    def read(cls, function) -> "_DictLogReading":
        reading = cls()
        function = inspect.unwrap(function)  # the source, line and file of what the user wrote
        source = _method_source(function)
        if source is not None:
            reading._walk(*source, function.__code__.co_firstlineno - 1, False)
        return reading

    def _walk(self, node, me: str, offset: int, branch: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Assign) and isinstance(child.value, ast.IfExp):
                keys = {_dict_keys(child.value.body), _dict_keys(child.value.orelse)}
                if len(keys) > 1:  # d = {"a": x} if c else {"a": x, "b": y}
                    self.changed.update(target.id for target in child.targets if isinstance(target, ast.Name))
            if branch and isinstance(child, ast.Subscript) and isinstance(child.value, ast.Name) \
                    and isinstance(child.ctx, (ast.Store, ast.Del)):
                self.changed.add(child.value.id)  # d[key] = ..., del d[key]
            elif branch and isinstance(child, ast.Name) and isinstance(child.ctx, ast.Store):
                self.changed.add(child.id)  # d = {...} again
            elif isinstance(child, ast.Call) and isinstance(child.func, ast.Name) and child.func.id == me:
                self.calls_self = True
            elif isinstance(child, ast.Call) and isinstance(child.func, ast.Attribute) \
                    and isinstance(child.func.value, ast.Name):
                owner, method = child.func.value.id, child.func.attr
                if branch and method in _DICT_CHANGES:
                    self.changed.add(owner)
                argument = child.args[0] if child.args else next(
                    (keyword.value for keyword in child.keywords if keyword.arg == "dictionary"), None)
                if owner == me and method == "log_dict" and isinstance(argument, ast.Name):
                    self.logged.append((argument.id, child.lineno + offset))
            self._walk(child, me, offset, branch or isinstance(child, _BRANCHES))


def explain_graph_failure(module, stop_at, hook: str, error: Exception) -> Optional[Exception]:
    """A clearer error for a step graph that failed to compile or in its first run, when the code shows why.

    The one mistake recognised: a `self.log_dict(d)`, in `hook` or a method it reaches (or
    `construct`, if one calls `self(...)`), of a dict whose keys change under a condition.
    Eagerly that works (the dry run passes); MindSpore's graph compiler cannot type such a
    dict when the condition is on a Tensor, and fails with an unrelated message (a dtype
    error while compiling, or "'Tensor' object has no attribute 'items'" when running). Read
    from the source: `d` changed through another name, or by a method it is passed to, is not
    seen. A condition on a Python value compiles, so it is named only when the graph failed.

    Args:
        module: The LightningCell instance.
        stop_at: LightningCell: its own methods are not read.
        hook: The step hook the graph runs.
        error: What MindSpore raised.

    Returns:
        A TypeError naming the hook, the method, the variable and the line, then MindSpore's
        message; None when no such `log_dict` is reached.
    """
    methods = _user_methods(type(module), stop_at)
    pending, seen = [hook], set()
    while pending:
        name = pending.pop(0)  # the hook first, then what it reaches, nearest first
        function = methods.get(name)
        if name in seen or not inspect.isfunction(function):
            continue
        seen.add(name)
        reading = _DictLogReading.read(function)
        for variable, line in reading.logged:
            if variable in reading.changed:
                return TypeError(
                    f"{type(module).__name__}.{hook} failed as a compiled graph, most likely because {name} calls "
                    f"self.log_dict({variable}) (line {line} of {inspect.getsourcefile(inspect.unwrap(function))}) "
                    f"with a dict whose keys change under a condition: MindSpore's graph compiler cannot follow a "
                    f"dict whose keys depend on a Tensor value. Log such a value with self.log(name, value) inside "
                    f"the condition, or give the dict the same keys on every step.\n"
                    f"MindSpore's error ({type(error).__name__}): {error}")
        uses = _self_uses(function)
        pending.extend(called for called, _ in (uses.calls if uses is not None else []))
        if reading.calls_self:
            pending.append("construct")
    return None


def _cannot_log(module, stop_at, name: str) -> bool:
    """Whether calling `self.<name>` (or something under it) runs no code that could log for the module.

    True for sub-cells, Parameters and MindSpore primitives held by the module, and for
    methods of `stop_at` (LightningCell) itself; False for anything else (a function or
    `functools.partial` set in `__init__`, a helper object that may hold the module).
    """
    if name in getattr(module, "_cells", {}) or name in getattr(module, "_params", {}):
        return True
    try:
        value = inspect.getattr_static(module, name)
    except AttributeError:
        return False
    if isinstance(value, (nn.Cell, Tensor, Primitive)):
        return True
    return not set_on_instance(module, name) and any(name in vars(klass) for klass in stop_at.__mro__)


def set_on_instance(module, name: str) -> bool:
    """Whether the user set a function for `name` on the module instance (not lightms's run-time shadow)."""
    own = module.__dict__.get(name)
    return own is not None and getattr(own, "__wrapped_method__", None) is None
