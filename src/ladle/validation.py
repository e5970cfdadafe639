"""Checks of user-supplied settings: one set, so every setting fails the same way.

Every configuration object (triggers, retention policies, `SaveRules`,
`EarlyStopping`, `EMAConfig`) and every call of the manager validates its
arguments with these functions when it is built or called, never after a
commit. A failure is a `ConfigError` whose one line names the argument, the
value given, and the values allowed: `EverySteps.n=2.5 is not allowed; use an
integer >= 1`. Booleans are refused where numbers are expected (`True` is an
`int` to Python, never what a user meant), and NaN is refused where a number
is compared.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from enum import Enum
from typing import Any, TypeVar

from ladle.errors import ConfigError

E = TypeVar("E", bound=Enum)


def _refuse(name: str, value: Any, allowed: str) -> ConfigError:
    return ConfigError(f"{name}={value!r} is not allowed; use {allowed}")


def check_int(name: str, value: Any, *, low: int) -> int:
    """`value` as an int >= `low`; bools, floats (2.5 and 3.0 alike) and strings are refused."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise _refuse(name, value, f"an integer >= {low}")
    return int(value)


def check_optional_int(name: str, value: Any, *, low: int) -> int | None:
    """None, or `value` checked by `check_int`."""
    return None if value is None else check_int(name, value, low=low)


def check_number(
    name: str, value: Any, *, low: float | None = None, high: float | None = None, open_low: bool = False
) -> float:
    """`value` as a finite float within the bounds; bools, NaN and non-numbers are refused."""
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if open_low else value >= low
    if ok and high is not None:
        ok = value <= high
    if not ok:
        bounds = []
        if low is not None:
            bounds.append(f"> {low}" if open_low else f">= {low}")
        if high is not None:
            bounds.append(f"<= {high}")
        raise _refuse(name, value, "a number" + (f" {' and '.join(bounds)}" if bounds else " (finite)"))
    return float(value)


def check_optional_number(
    name: str, value: Any, *, low: float | None = None, high: float | None = None, open_low: bool = False
) -> float | None:
    """None, or `value` checked by `check_number`."""
    return None if value is None else check_number(name, value, low=low, high=high, open_low=open_low)


def check_numbers(name: str, values: Any) -> list[float]:
    """A non-empty sequence of finite numbers, as floats."""
    if isinstance(values, str | bytes) or not isinstance(values, Sequence) or not values:
        raise _refuse(name, values, "a non-empty list of finite numbers")
    return [check_number(f"{name}[{i}]", v) for i, v in enumerate(values)]


def check_name(name: str, value: Any, *, what: str = "a metric name") -> str:
    """A non-empty string (metric names, run paths)."""
    if not isinstance(value, str) or not value:
        raise _refuse(name, value, f"{what} (a non-empty string)")
    return value


def check_bool(name: str, value: Any) -> bool:
    """Exactly True or False (a string "False" would otherwise count as true)."""
    if not isinstance(value, bool):
        raise _refuse(name, value, "True or False")
    return value


def parse_enum(kind: type[E], value: Any, name: str) -> E:
    """`value` (a member or its string value) as a member of `kind`."""
    try:
        return kind(value)
    except ValueError:
        allowed = ", ".join(repr(m.value) for m in kind)
        raise _refuse(name, value, f"one of {allowed}") from None
