"""Hyperparameters: `save_hyperparameters()` reads the caller's `__init__` arguments."""

import inspect
from typing import Any, Dict


class AttributeDict(dict):
    """A dict whose keys are also attributes (`hparams.lr` and `hparams["lr"]`)."""

    def __getattr__(self, key: str) -> Any:
        try:
            return self[key]
        except KeyError as err:
            raise AttributeError(f"hparams has no {key!r}; saved: {sorted(self)}") from err

    def __setattr__(self, key: str, value: Any) -> None:
        self[key] = value


def collect_init_arguments(frame, instance) -> Dict[str, Any]:
    """Returns the named arguments of the `__init__` call running in `frame`.

    Args:
        frame: The frame of the `__init__` that called `save_hyperparameters`.
        instance: The object being initialised (`self` in that frame).

    Returns:
        Argument name to value, `*args`/`**kwargs` flattened as Lightning does
        (extra keyword arguments are merged in, extra positionals are dropped).

    Raises:
        RuntimeError: If `frame` is not an `__init__` of `instance`.
    """
    local_vars = frame.f_locals
    if frame.f_code.co_name != "__init__" or local_vars.get("self") is not instance:
        raise RuntimeError("save_hyperparameters() must be called from the module's __init__.")
    info = inspect.getargvalues(frame)
    arguments = {name: local_vars[name] for name in info.args if name != "self" and name in local_vars}
    if info.keywords and isinstance(local_vars.get(info.keywords), dict):
        arguments.update(local_vars[info.keywords])
    return arguments
