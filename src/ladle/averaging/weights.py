"""How much each member of an average counts: uniform, explicit, softmax over a metric, recency.

A weighting turns the members' records (step, metrics) into non-negative
numbers, always normalized to sum to one. The same strings work in Python and
on the command line, and `str()` gives them back:

    uniform                      every member the same
    0.5,0.3,0.2                  explicit, in member order (normalized)
    softmax:val_acc:max[:T]      w ∝ exp(score / T), score = metric (max) or -metric (min); T=1
    recency:HALF_LIFE            w ∝ 0.5 ** ((newest step - step) / HALF_LIFE)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from ladle.errors import ConfigError
from ladle.metrics import Mode, is_finite_number, parse_mode


class Weighed(Protocol):
    """What a weighting may look at: a member's label, step and recorded metrics."""

    @property
    def label(self) -> str: ...
    @property
    def step(self) -> int | None: ...
    @property
    def metrics(self) -> dict[str, Any]: ...


class Weighting:
    """Base of the weightings: `raw()` gives unnormalized weights, `__call__` normalized ones."""

    uniform = False

    def raw(self, members: Sequence[Weighed]) -> list[float]:
        raise NotImplementedError

    def __call__(self, members: Sequence[Weighed]) -> list[float]:
        if not members:
            return []
        return normalize(self.raw(members), [m.label for m in members])


@dataclass(frozen=True, kw_only=True)
class Uniform(Weighting):
    """Every member counts the same."""

    uniform = True

    def raw(self, members: Sequence[Weighed]) -> list[float]:
        return [1.0] * len(members)

    def __str__(self) -> str:
        return "uniform"


@dataclass(frozen=True, kw_only=True)
class Explicit(Weighting):
    """Given numbers, one per member in order."""

    values: tuple[float, ...]
    """One weight per member, in the order the members are listed (normalized)."""

    def __post_init__(self) -> None:
        if not self.values:
            raise ConfigError("weights: give at least one number")

    def raw(self, members: Sequence[Weighed]) -> list[float]:
        if len(self.values) != len(members):
            raise ConfigError(
                f"weights: {len(self.values)} numbers for {len(members)} members; give one per member "
                f"({', '.join(m.label for m in members[:4])}{', ...' if len(members) > 4 else ''})"
            )
        return [float(v) for v in self.values]

    def __str__(self) -> str:
        return ",".join(f"{v:g}" for v in self.values)


@dataclass(frozen=True, kw_only=True)
class Softmax(Weighting):
    """w ∝ exp(score / temperature), where score is the metric (max) or its negative (min)."""

    metric: str
    """The recorded metric the weights follow."""
    mode: Mode
    """Whether higher ("max") or lower ("min") values of the metric are better."""
    temperature: float = 1.0
    """Larger spreads weight evenly, smaller favours the best member; must be > 0."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "mode", parse_mode(self.mode, field="softmax mode"))
        if not (is_finite_number(self.temperature) and self.temperature > 0):
            raise ConfigError(f"softmax temperature={self.temperature!r} must be a number above 0")

    def raw(self, members: Sequence[Weighed]) -> list[float]:
        scores = []
        for m in members:
            value = m.metrics.get(self.metric)
            if not is_finite_number(value):
                raise ConfigError(
                    f"{m.label}: no finite value of {self.metric!r} (got {value!r}); softmax weights "
                    "need it recorded for every member"
                )
            score = float(value) if self.mode is Mode.MAX else -float(value)
            scores.append(score / self.temperature)
        top = max(scores)
        return [math.exp(s - top) for s in scores]

    def __str__(self) -> str:
        return f"softmax:{self.metric}:{self.mode.value}:{self.temperature:g}"


@dataclass(frozen=True, kw_only=True)
class Recency(Weighting):
    """w ∝ 0.5 ** ((newest step - step) / half_life): newer checkpoints count more."""

    half_life: float
    """Steps after which a member's weight halves; must be > 0."""

    def __post_init__(self) -> None:
        if not (is_finite_number(self.half_life) and self.half_life > 0):
            raise ConfigError(f"recency half_life={self.half_life!r} must be a number of steps above 0")

    def raw(self, members: Sequence[Weighed]) -> list[float]:
        missing = [m.label for m in members if m.step is None]
        if missing:
            raise ConfigError(
                f"{missing[0]}: no recorded step; recency weights need the step of every member"
            )
        newest = max(int(m.step) for m in members)  # type: ignore[arg-type]
        return [0.5 ** ((newest - int(m.step)) / self.half_life) for m in members]  # type: ignore[arg-type]

    def __str__(self) -> str:
        return f"recency:{self.half_life:g}"


WeightsLike = str | Sequence[float] | Weighting | None


def parse_weights(spec: WeightsLike) -> Weighting:
    """A `Weighting` from a string (see the module docstring), a list of numbers, or itself."""
    if spec is None:
        return Uniform()
    if isinstance(spec, Weighting):
        return spec
    if not isinstance(spec, str):
        return Explicit(values=tuple(_number(v, "weights") for v in spec))
    text = spec.strip()
    head, _, rest = text.partition(":")
    if text == "uniform":
        return Uniform()
    if head == "softmax":
        parts = rest.split(":")
        if len(parts) not in (2, 3) or not parts[0]:
            raise ConfigError(f"weights {spec!r}: write softmax:METRIC:min|max[:TEMPERATURE]")
        temperature = _number(parts[2], "softmax temperature") if len(parts) == 3 else 1.0
        return Softmax(
            metric=parts[0], mode=parse_mode(parts[1], field="softmax mode"), temperature=temperature
        )
    if head == "recency":
        if not rest:
            raise ConfigError(f"weights {spec!r}: write recency:HALF_LIFE_IN_STEPS")
        return Recency(half_life=_number(rest, "recency half-life"))
    try:
        return Explicit(values=tuple(_number(v, "weights") for v in text.split(",")))
    except ConfigError:
        raise ConfigError(
            f"weights {spec!r} not understood; use uniform, a list like 0.5,0.3,0.2, "
            "softmax:METRIC:min|max[:T] or recency:HALF_LIFE"
        ) from None


def _number(value: Any, field: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{field}: {value!r} is not a number") from None
    return number


def normalize(raw: Sequence[float], labels: Sequence[str]) -> list[float]:
    """Weights that sum to one; negative, non-finite or all-zero weights are refused."""
    for value, label in zip(raw, labels, strict=True):
        if not is_finite_number(value):
            raise ConfigError(f"weight of {label} is {value!r}; weights must be finite numbers")
        if value < 0:
            raise ConfigError(f"weight of {label} is {value:g}; weights must not be negative")
    total = math.fsum(raw)
    if total <= 0:
        raise ConfigError("all weights are zero; give at least one member a positive weight")
    return [float(v) / total for v in raw]
