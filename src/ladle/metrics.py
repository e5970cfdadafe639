"""Comparing metric values: directions (min/max) and what counts as a usable value."""

from __future__ import annotations

import math
from enum import Enum
from typing import Any

from ladle.errors import ConfigError


class Mode(str, Enum):
    """Which direction of a metric is better."""

    MIN = "min"
    MAX = "max"


def parse_mode(value: str | Mode, *, field: str = "mode") -> Mode:
    """`"min"`/`"max"` (or a Mode) as a Mode; anything else is a ConfigError naming `field`."""
    try:
        return Mode(value)
    except ValueError:
        raise ConfigError(f"{field}={value!r} is not a direction; use 'min' or 'max'") from None


def is_finite_number(value: Any) -> bool:
    """True for a real, finite number (NaN and inf never count as best)."""
    if isinstance(value, bool):
        return False
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def is_better(candidate: Any, incumbent: Any, mode: Mode | str) -> bool:
    """Whether `candidate` strictly beats `incumbent`; non-finite values never win."""
    if not is_finite_number(candidate):
        return False
    if not is_finite_number(incumbent):
        return True
    if Mode(mode) is Mode.MIN:
        return float(candidate) < float(incumbent)
    return float(candidate) > float(incumbent)


def sort_key(value: Any, mode: Mode | str) -> float:
    """A key that sorts best first; non-finite values sort last."""
    if not is_finite_number(value):
        return math.inf
    return float(value) if Mode(mode) is Mode.MIN else -float(value)
