"""Argument checks that raise a ValueError naming the argument, its value and what is accepted."""

from __future__ import annotations

import math
from typing import Iterable, Optional


def check_number(
    name: str,
    value,
    low: Optional[float] = None,
    high: Optional[float] = None,
    low_open: bool = False,
    high_open: bool = False,
    allow_none: bool = False,
):
    """Return `value` as float if it is a finite number within the bounds; raise ValueError otherwise."""
    if value is None and allow_none:
        return None
    left = "(" if low_open else "["
    right = ")" if high_open else "]"
    accepted = f"a finite number in {left}{'-inf' if low is None else low}, {'inf' if high is None else high}{right}"
    if allow_none:
        accepted += " or None"
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: {value!r} is not accepted; accepted: {accepted}") from None
    if isinstance(value, bool) or not math.isfinite(number):
        raise ValueError(f"{name}: {value!r} is not accepted; accepted: {accepted}")
    too_low = low is not None and (number <= low if low_open else number < low)
    too_high = high is not None and (number >= high if high_open else number > high)
    if too_low or too_high:
        raise ValueError(f"{name}: {value!r} is not accepted; accepted: {accepted}")
    return number


def check_choice(name: str, value, choices: Iterable):
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{name}: {value!r} is not accepted; accepted: {', '.join(repr(c) for c in choices)}")
    return value


def check_window(start, stop) -> tuple[float, float]:
    """`start`/`stop` as fractions of the steps, 0 <= start < stop <= 1 (diffusers guiders' convention)."""
    start = check_number("start", start, 0.0, 1.0)
    stop = check_number("stop", stop, 0.0, 1.0)
    if start >= stop:
        raise ValueError(f"start: {start} must be below stop: {stop}; accepted: 0 <= start < stop <= 1")
    return start, stop
