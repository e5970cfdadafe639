"""Metric values: directions (min/max), what counts as a usable value, and their JSON encoding."""

from __future__ import annotations

import math
from collections.abc import Mapping
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


# -- the one metric encoder ------------------------------------------------------------
#
# JSON has no NaN or infinity, and a bare `NaN` makes a file unreadable to strict
# parsers; every metric ladle writes (meta.json, ladle.json, history.jsonl, reports)
# goes through `encode_metric`, which spells non-finite values as the strings
# "nan", "inf" and "-inf". Readers need nothing special: `is_finite_number("nan")`
# is False, so such values never count as best, and `float("inf")` parses them back.

MetricValue = int | float | str
_NON_FINITE = ("nan", "inf", "-inf")


def _scalar(value: Any) -> Any:
    """Unwrap a one-element tensor or a numpy scalar; anything else unchanged."""
    numel = getattr(value, "numel", None)
    if callable(numel) and numel() != 1:
        return value
    size = getattr(value, "size", None)
    if isinstance(size, int) and size != 1:
        return value
    item = getattr(value, "item", None)
    return item() if callable(item) else value


def _encode_number(value: int | float) -> MetricValue:
    if isinstance(value, int):
        return value
    value = float(value)
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return value


def metric_value(value: Any) -> MetricValue | None:
    """A metric as a JSON value: a number, or "nan"/"inf"/"-inf"; None when it is not a number.

    Accepts Python numbers, one-element tensors and numpy scalars, and the
    strings "nan"/"inf"/"-inf" that ladle itself writes. Booleans are not metrics.
    """
    value = _scalar(value)
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return _encode_number(value)
    if isinstance(value, str) and value in _NON_FINITE:
        return value
    return None


def encode_metrics(metrics: Any, *, where: str = "metrics", lenient: bool = False) -> dict[str, MetricValue]:
    """`{name: value}` as JSON values (see `metric_value`).

    A value that is not a number is a ConfigError naming `where` and the key, raised
    before anything is written; with `lenient=True` it is dropped instead (metrics a
    framework logs, which may hold whole tensors or strings).
    """
    if metrics is None:
        return {}
    if not isinstance(metrics, Mapping):
        raise ConfigError(
            f"{where}={metrics!r} is not allowed; use a mapping of metric names to numbers, "
            'e.g. {"loss": 0.25}'
        )
    out: dict[str, MetricValue] = {}
    for key, value in metrics.items():
        encoded = metric_value(value)
        if encoded is None:
            if lenient:
                continue
            raise ConfigError(
                f"{where}[{key!r}]={_short(value)} is not allowed; use a number "
                "(a Python number, a one-element tensor or a numpy scalar)"
            )
        if not isinstance(key, str) or not key:
            if lenient:
                continue
            raise ConfigError(f"{where} key {key!r} is not allowed; use a non-empty string")
        out[key] = encoded
    return out


def json_value(value: Any) -> Any:
    """Any value as strict JSON: metric encoding for floats, lists for tuples, text for the rest."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return _encode_number(value)
    if isinstance(value, Mapping):
        return {str(k): json_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_value(v) for v in value]
    encoded = metric_value(value)
    return encoded if encoded is not None else str(value)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:57]}..."
