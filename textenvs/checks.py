"""Argument and value checks shared by the envs, the agents' configs and the files they load:
each returns the value or raises a ValueError that names the argument or field, what it got and
what it takes."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def check_int(name: str, value: Any, low: int | None = None, high: int | None = None) -> int:
    """An int (not a bool) in ``[low, high]``."""
    if (
        not _is_int(value)
        or (low is not None and value < low)
        or (high is not None and value > high)
    ):
        raise ValueError(f"{name} must be an int{_range(low, high)}, got {value!r}.")
    return int(value)


def check_float(
    name: str,
    value: Any,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """A finite number (an int or a float, not a bool) in the range, ends open where asked."""
    ok = (
        (_is_int(value) or isinstance(value, (float, np.floating)))
        and math.isfinite(value)
        and (low is None or (value > low if low_open else value >= low))
        and (high is None or (value < high if high_open else value <= high))
    )
    if not ok:
        bounds = _range(low, high, low_open, high_open)
        raise ValueError(f"{name} must be a finite number{bounds}, got {value!r}.")
    return float(value)


def ints(low: int | None = None, high: int | None = None):
    """``check(name, value)`` of an int in ``[low, high]`` (:func:`check_int`): the entries of a
    config's table of field checks, and of the command line's flag types."""
    return lambda name, value: check_int(name, value, low, high)


def floats(
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
):
    """``check(name, value)`` of a finite number in the range (:func:`check_float`)."""
    return lambda name, value: check_float(name, value, low, high, low_open, high_open)


def optional(check):
    """``check(name, value)`` that also lets None through (a field whose None means "choose for
    me" or "off")."""
    return lambda name, value: None if value is None else check(name, value)


SEED = ints(0, 2**32 - 1)
"""A seed: an int NumPy's and torch's generators take."""


def check_optional_str(name: str, value: Any) -> str | None:
    if value is not None and not isinstance(value, str):
        raise ValueError(f"{name} must be a string or None, got {value!r}.")
    return value


def _range(low, high, low_open: bool = False, high_open: bool = False) -> str:
    if low is not None and high is not None:
        return f" in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    if low is not None:
        return f" {'>' if low_open else '>='} {low}"
    if high is not None:
        return f" {'<' if high_open else '<='} {high}"
    return ""


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not valid: choose one of {list(choices)}.")


def check_bool(name: str, value: Any) -> bool:
    """``value`` as a bool: True or False (NumPy's too); anything else, ``"False"`` included, is
    refused with a message (a non-empty string would read as True)."""
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be True or False, got {value!r}.")
    return bool(value)


def check_positive_int(name: str, value: Any) -> int:
    return check_int(name, value, 1)


def renamed_argument(
    new_name: str, new_value: Any, default: Any, old_name: str, old_value: Any
) -> Any:
    """The value of an argument that has a deprecated old name (``old_value`` None: not given)."""
    if old_value is None:
        return new_value
    warnings.warn(
        f"{old_name}= is deprecated: pass {new_name}= (the same knob in every textenvs env).",
        DeprecationWarning,
        stacklevel=4,
    )
    if new_value != default and new_value != old_value:
        raise ValueError(
            f"Got {new_name}={new_value!r} and its deprecated name {old_name}={old_value!r}: pass "
            f"only {new_name}=."
        )
    return old_value
