"""Calling a hook on the callbacks and the module, in `order`, skipping those that keep the default.

Between two compiled steps every Python operation costs several times what it
costs in a tight loop (`benchmarks/README.md`), so who receives each hook is
worked out once per run and hook, not on every call.
"""

from dataclasses import dataclass
from typing import Any, List, Tuple

from lightms.callbacks.callback import Callback
from lightms.module.cell import LightningCell
from lightms.engine.binding import set_on_instance
from lightms.trainer.metrics import stage_of_hook


@dataclass(frozen=True)
class HookReceivers:
    """Who does something in one hook.

    Attributes:
        before: Callbacks that override it, ordered before the module (order < MODULE_ORDER).
        module_class: Whether the module's class overrides LightningCell's no-op.
        after: Callbacks that override it, ordered after the module.
        callback_count: len(trainer.callbacks) when this was worked out (a callback added later rebuilds it).
        instance_hook: What the module instance held under the hook's name when this was worked
            out (a function set on it later rebuilds it; one set on a callback instance during a
            run is not seen, as a callback is asked only for what it overrode when this was built).
    """

    before: Tuple[Callback, ...]
    module_class: bool
    after: Tuple[Callback, ...]
    callback_count: int
    instance_hook: Any


def overrides(callback: Callback, hook: str) -> bool:
    """Whether `callback` does something in `hook` (a subclass method or a function set on the instance)."""
    return getattr(getattr(callback, hook), "__func__", None) is not getattr(Callback, hook)


def receivers_of(callbacks: List[Callback], model: LightningCell, hook: str) -> HookReceivers:
    """Works out who receives `hook` (callback-only hooks such as on_sanity_check_* have no module side)."""
    active = [cb for cb in callbacks if overrides(cb, hook)]
    module_class = getattr(type(model), hook, None) not in (None, getattr(LightningCell, hook, None))
    return HookReceivers(tuple(cb for cb in active if cb.order < Callback.MODULE_ORDER), module_class,
                         tuple(cb for cb in active if cb.order >= Callback.MODULE_ORDER), len(callbacks),
                         model.__dict__.get(hook))


def hook_receivers(trainer, hook: str) -> HookReceivers:
    """Who receives `hook` in this run, worked out once (again when a callback was added or a function set
    on the module instance since)."""
    receivers = trainer._hook_receivers.get(hook)
    if (receivers is None or receivers.callback_count != len(trainer.callbacks)
            or receivers.instance_hook is not trainer.model.__dict__.get(hook)):
        receivers = trainer._hook_receivers[hook] = receivers_of(trainer.callbacks, trainer.model, hook)
    return receivers


def call_hook(trainer, hook: str, *args) -> Any:
    """Calls `hook` on the trainer's callbacks and module, in `order` (the module at Callback.MODULE_ORDER).

    A callback appended to `trainer.callbacks` during a run gets the hooks called after
    the one that added it.

    Returns:
        What the module's hook returned (None if the module has no such hook).
    """
    receivers = hook_receivers(trainer, hook)
    model = trainer.model
    if not receivers.before and not receivers.after:  # the usual case: the module alone, or no one
        if not (receivers.module_class or set_on_instance(model, hook)):
            return None
    binding = trainer._binding
    # `module.log` works from the module's hook and from callbacks' (as Lightning's `pl_module.log`); a hook
    # called from inside another (a callback running validation) gives the outer one its target back after.
    outer = (model._lightms_hook, model._lightms_log_target)
    binding.host_hook(hook, trainer._metrics.host[stage_of_hook(hook)])
    returned = None
    try:
        for cb in receivers.before:
            getattr(cb, hook)(trainer, model, *args)
        if receivers.module_class or set_on_instance(model, hook):
            returned = getattr(model, hook)(*args)
        for cb in receivers.after:
            getattr(cb, hook)(trainer, model, *args)
    finally:
        binding.host_hook(*outer)
    return returned


__all__ = ["HookReceivers", "call_hook", "hook_receivers", "overrides", "receivers_of", "set_on_instance"]
