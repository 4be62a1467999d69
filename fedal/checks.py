"""Checks of scalar arguments, with messages that name the argument, the value and the range.

A bool is never taken for a number (``True`` is an ``int`` to Python, not to a user).
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from fedal.exceptions import ConfigError


def require_int(name: str, value: Any, *, low: int | None = None, high: int | None = None) -> int:
    """``value`` as an ``int`` if it is an integer in ``[low, high]``; else :class:`ConfigError`.

    Parameters
    ----------
    name : str
        The argument's name, for the message.
    value : any
        What was given.
    low, high : int, optional
        Inclusive bounds.
    """
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise ConfigError(f"{name} must be an integer{_range(low, high)}, got {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise ConfigError(f"{name} must be an integer{_range(low, high)}, got {value!r}")
    return int(value)


def require_number(name: str, value: Any, *, low: float | None = None, high: float | None = None,
                   low_open: bool = False) -> float:
    """``value`` as a finite ``float`` in ``[low, high]`` (``(low, high]`` if ``low_open``).

    Parameters
    ----------
    name : str
        The argument's name, for the message.
    value : any
        What was given.
    low, high : float, optional
        Bounds; ``low_open`` excludes ``low`` itself.
    """
    bad = (isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating))
           or not math.isfinite(float(value)))
    if not bad:
        value = float(value)
        bad = ((low is not None and (value <= low if low_open else value < low))
               or (high is not None and value > high))
    if bad:
        raise ConfigError(f"{name} must be a finite number{_range(low, high, low_open)}, got {value!r}")
    return value


def _range(low, high, low_open: bool = False) -> str:
    if low is not None and high is not None:
        return f" in {'(' if low_open else '['}{low}, {high}]"
    if low is not None:
        return f" {'>' if low_open else '>='} {low}"
    if high is not None:
        return f" <= {high}"
    return ""
