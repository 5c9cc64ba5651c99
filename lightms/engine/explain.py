"""Explains a step graph's failure from the user's code, after MindSpore raised.

Reading the user's source never decides what a graph computes: it is read only once
a new graph failed, to name the user's mistake before MindSpore's message.
"""

import ast
import inspect
import textwrap
from typing import Dict, List, Optional, Tuple


def _user_methods(cls, stop_at) -> Dict[str, object]:
    """Name -> the most derived definition, of what the classes in `cls`'s MRO other than `stop_at` and its
    bases define (static and class methods as their functions)."""
    skipped = set(stop_at.__mro__)
    methods: Dict[str, object] = {}
    for klass in cls.__mro__:
        if klass in skipped:
            continue
        for name, value in vars(klass).items():
            methods.setdefault(name, value.__func__ if isinstance(value, (staticmethod, classmethod)) else value)
    return methods


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
        calls: Names of the methods it calls as `self.<name>(...)`.
        calls_self: Whether the method calls `self(...)`, which runs `construct`.
    """

    def __init__(self):
        self.changed = set()
        self.logged: List[Tuple[str, int]] = []
        self.calls: List[str] = []
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
                if owner == me:
                    self.calls.append(method)
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
        pending.extend(reading.calls)
        if reading.calls_self:
            pending.append("construct")
    return None


__all__ = ["explain_graph_failure"]
