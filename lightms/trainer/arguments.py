"""Checks and resolves Trainer arguments: each error names the argument and what was expected."""

import numbers
from typing import List

from lightms.callbacks.callback import Callback
from lightms.callbacks.model_checkpoint import ModelCheckpoint
from lightms.callbacks.progress import TQDMProgressBar
from lightms.loggers.logger import Logger
from lightms.loggers.tensorboard import TensorBoardLogger


def check_int(name: str, value, minimum: int, allow_none: bool = False):
    """Returns `value` if it is an int >= minimum (or None when allowed).

    Raises:
        TypeError: If `value` is not an int (bools are rejected).
        ValueError: If it is below `minimum`.
    """
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"Trainer({name}=...) must be an int >= {minimum}, got {value!r}.")
    if value < minimum:
        raise ValueError(f"Trainer({name}=...) must be an int >= {minimum}, got {value}.")
    return int(value)


def check_limit(name: str, value):
    """Returns a `limit_*_batches` value: None, an int >= 0 or a float in [0, 1].

    Raises:
        TypeError: For any other type.
        ValueError: For a negative int or a float outside [0, 1].
    """
    if value is None:
        return None
    if isinstance(value, float):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"Trainer({name}=...) as a float must be a fraction in [0, 1], got {value}.")
        return value
    return check_int(name, value, 0)


def check_number(name: str, value, minimum: float, allow_none: bool = True):
    """Returns `value` as a float if it is a number >= minimum (or None when allowed).

    Raises:
        TypeError: If `value` is not a real number.
        ValueError: If it is below `minimum`.
    """
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"Trainer({name}=...) must be a number >= {minimum}, got {value!r}.")
    if value < minimum:
        raise ValueError(f"Trainer({name}=...) must be >= {minimum}, got {value}.")
    return float(value)


def check_choice(name: str, value, choices):
    """Returns `value` if it is one of `choices`.

    Raises:
        ValueError: Otherwise.
    """
    if value not in choices:
        raise ValueError(f"Trainer({name}=...) must be one of {tuple(choices)}, got {value!r}.")
    return value


def check_bool(name: str, value) -> bool:
    """Returns `value` if it is a bool.

    Raises:
        TypeError: Otherwise.
    """
    if not isinstance(value, bool):
        raise TypeError(f"Trainer({name}=...) must be True or False, got {value!r}.")
    return value


def check_val_check_interval(value):
    """Returns None, an int >= 1 (optimizer steps) or a float in (0, 1] (fraction of an epoch).

    Raises:
        TypeError: For any other type.
        ValueError: For values out of range.
    """
    if value is None:
        return None
    if isinstance(value, float):
        if not 0.0 < value <= 1.0:
            raise ValueError(f"Trainer(val_check_interval=...) as a float must be in (0, 1], got {value}.")
        return value
    return check_int("val_check_interval", value, 1)


def check_sink_size(value):
    """Returns an int >= 1 or "epoch".

    Raises:
        TypeError, ValueError: For anything else.
    """
    if value == "epoch":
        return value
    if isinstance(value, str):
        raise ValueError(f'Trainer(sink_size=...) must be an int >= 1 or "epoch", got {value!r}.')
    return check_int("sink_size", value, 1)


def check_plugins(plugins):
    """Checks `Trainer(plugins=...)` and returns its `lightms.privacy.DPSGD`, or None.

    Raises:
        TypeError: For anything but a DPSGD (or a list holding at most one).
    """
    from lightms.privacy.dpsgd import DPSGD

    if plugins is None:
        return None
    items = list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
    for item in items:
        if not isinstance(item, DPSGD):
            raise TypeError(f"Trainer(plugins=...) holds a {type(item).__name__}; lightms's plugins are "
                            "lightms.privacy.DPSGD (precision is Trainer(precision=...)).")
    if len(items) > 1:
        raise ValueError(f"Trainer(plugins=...) holds {len(items)} DPSGD plugins; give one.")
    return items[0] if items else None


def build_callbacks(callbacks, enable_progress_bar: bool, enable_checkpointing: bool) -> List[Callback]:
    """Checks `Trainer(callbacks=...)`, adds the default progress bar and checkpoint, and sorts by `order`.

    Raises:
        TypeError: If an element is not a lightms Callback.
        ValueError: If a flag contradicts a callback that was passed.
    """
    if callbacks is None:
        callbacks = []
    elif isinstance(callbacks, Callback):
        callbacks = [callbacks]
    elif not isinstance(callbacks, (list, tuple)):
        raise TypeError(f"Trainer(callbacks=...) must be a Callback or a list of them, got {type(callbacks).__name__}.")
    callbacks = list(callbacks)
    for cb in callbacks:
        if not isinstance(cb, Callback):
            raise TypeError(f"Trainer(callbacks=...) holds a {type(cb).__name__}, which is not a lightms Callback.")
    for flag, enabled, kind, default in (("enable_progress_bar", enable_progress_bar, TQDMProgressBar, TQDMProgressBar),
                                         ("enable_checkpointing", enable_checkpointing, ModelCheckpoint, ModelCheckpoint)):
        present = any(isinstance(cb, kind) for cb in callbacks)
        if present and not enabled:
            raise ValueError(f"Trainer({flag}=False) contradicts the {kind.__name__} in callbacks: drop one of them.")
        if enabled and not present:
            callbacks.append(default())
    return sorted(callbacks, key=lambda cb: cb.order)


def build_loggers(logger, default_root_dir: str) -> List[Logger]:
    """Turns `Trainer(logger=...)` into a list: True is a TensorBoardLogger under `default_root_dir`.

    Raises:
        TypeError: For anything but a bool, a Logger or a list of Loggers.
    """
    if logger is True:
        return [TensorBoardLogger(default_root_dir)]
    if logger is False or logger is None:
        return []
    loggers = [logger] if isinstance(logger, Logger) else logger
    if not isinstance(loggers, (list, tuple)) or not all(isinstance(lg, Logger) for lg in loggers):
        raise TypeError(f"Trainer(logger=...) must be True, False, a Logger or a list of Loggers, got {logger!r}.")
    return list(loggers)
