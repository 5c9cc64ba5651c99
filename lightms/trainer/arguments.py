"""Checks for Trainer arguments: each names the argument and what was expected."""

import numbers


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
