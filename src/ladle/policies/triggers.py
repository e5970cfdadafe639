"""When to save: small policies, each answering one question about one training event.

A manager asks every trigger at each `step()` and `epoch_end()` call and saves when
any fires. Triggers with memory (thresholds already crossed, best value seen) keep
it in `state_dict()`, so a resumed run does not fire them again.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from ladle.errors import ConfigError
from ladle.metrics import Mode, is_better, is_finite_number, parse_mode

EventKind = Literal["step", "epoch"]


@dataclass(frozen=True)
class Event:
    """One call of the training loop into the manager."""

    kind: EventKind
    step: int
    epoch: int | None
    metrics: Mapping[str, Any]
    seconds_since_save: float


class Trigger:
    """Base class: decide from an event whether to save; optionally stateful."""

    def fires(self, event: Event) -> bool:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Stateless triggers have nothing to restore."""


def _positive(value: float, name: str) -> None:
    if not value > 0:
        raise ConfigError(f"{name} must be > 0, got {value!r}")


@dataclass(kw_only=True)
class EverySteps(Trigger):
    """Save at every `n`-th step (on `step()` calls)."""

    n: int
    """Steps between saves."""

    def __post_init__(self) -> None:
        _positive(self.n, "EverySteps.n")

    def fires(self, event: Event) -> bool:
        return event.kind == "step" and event.step % self.n == 0


@dataclass(kw_only=True)
class EveryEpochs(Trigger):
    """Save at the end of every `n`-th epoch (epochs counted from 0: epoch e is the (e+1)-th)."""

    n: int
    """Epochs between saves."""

    def __post_init__(self) -> None:
        _positive(self.n, "EveryEpochs.n")

    def fires(self, event: Event) -> bool:
        return event.kind == "epoch" and event.epoch is not None and (event.epoch + 1) % self.n == 0


@dataclass(kw_only=True)
class EverySeconds(Trigger):
    """Save when `seconds` of wall time have passed since the last save (or the start)."""

    seconds: float
    """Wall-clock seconds between saves (the Transformer paper saved every 600)."""

    def __post_init__(self) -> None:
        _positive(self.seconds, "EverySeconds.seconds")

    def fires(self, event: Event) -> bool:
        return event.seconds_since_save >= self.seconds


@dataclass(kw_only=True)
class OnImprovement(Trigger):
    """Save when `metric` is strictly better than every value reported before."""

    metric: str
    """Name of the metric, as passed in `metrics=`."""
    mode: Mode | str = Mode.MIN
    """"min" or "max": which direction is better."""
    best: float | None = field(default=None)

    def __post_init__(self) -> None:
        self.mode = parse_mode(self.mode, field="OnImprovement.mode")

    def fires(self, event: Event) -> bool:
        value = event.metrics.get(self.metric)
        if value is None or not is_better(value, self.best, self.mode):
            return False
        self.best = float(value)
        return True

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.best = state.get("best")


@dataclass(kw_only=True)
class OnThreshold(Trigger):
    """Save the first time `metric` reaches each of `thresholds` (>= for max, <= for min)."""

    metric: str
    """Name of the metric, as passed in `metrics=`."""
    thresholds: Sequence[float]
    """Values that each fire once when first reached."""
    mode: Mode | str = Mode.MAX
    """"max": fires when the metric rises to a threshold; "min": when it falls to one."""
    crossed: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.mode = parse_mode(self.mode, field="OnThreshold.mode")
        if not self.thresholds:
            raise ConfigError("OnThreshold.thresholds must name at least one value")
        self.thresholds = sorted(float(t) for t in self.thresholds)

    def fires(self, event: Event) -> bool:
        value = event.metrics.get(self.metric)
        if not is_finite_number(value):
            return False
        value = float(value)
        reached = [
            t
            for t in self.thresholds
            if t not in self.crossed and (value >= t if self.mode is Mode.MAX else value <= t)
        ]
        self.crossed.extend(reached)
        return bool(reached)

    def state_dict(self) -> dict[str, Any]:
        return {"crossed": list(self.crossed)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.crossed = [float(t) for t in state.get("crossed", [])]


class Clock:
    """Seconds since the last save, on the monotonic clock (immune to wall-clock jumps)."""

    def __init__(self) -> None:
        self.last = time.monotonic()

    def reset(self) -> None:
        self.last = time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.last
