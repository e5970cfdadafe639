"""When to save: small policies, each answering one question about one training event.

The save engine asks every trigger at each `step()` and `epoch_end()` call and saves
when any fires. Triggers with memory (thresholds already crossed, best value seen)
keep it in `state_dict()`, so a resumed run does not fire them again. Each trigger
can say why it fired (`describe()`), which the engine logs at debug level.

Direction: a metric's `mode` defaults to "min" (a loss) here as everywhere in
ladle (`SaveRules`, `KeepBest`, `EarlyStopping`); pass `mode="max"` for accuracy-like
metrics. Triggers built by `SaveRules` take the rules' `mode`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from ladle.metrics import Mode, is_better, is_finite_number, parse_mode
from ladle.validation import check_int, check_name, check_number, check_numbers

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

    def describe(self, event: Event) -> str:
        """Why this trigger fired at `event`, for the log (called only after it fired)."""
        return type(self).__name__


@dataclass(kw_only=True)
class EverySteps(Trigger):
    """Save at every `n`-th step (on `step()` calls)."""

    n: int
    """Steps between saves."""

    def __post_init__(self) -> None:
        self.n = check_int("EverySteps.n", self.n, low=1)

    def fires(self, event: Event) -> bool:
        return event.kind == "step" and event.step % self.n == 0

    def describe(self, event: Event) -> str:
        return f"EverySteps(n={self.n}): step {event.step}"


@dataclass(kw_only=True)
class EveryEpochs(Trigger):
    """Save at the end of every `n`-th epoch (epochs counted from 0: epoch e is the (e+1)-th)."""

    n: int
    """Epochs between saves."""

    def __post_init__(self) -> None:
        self.n = check_int("EveryEpochs.n", self.n, low=1)

    def fires(self, event: Event) -> bool:
        return event.kind == "epoch" and event.epoch is not None and (event.epoch + 1) % self.n == 0

    def describe(self, event: Event) -> str:
        return f"EveryEpochs(n={self.n}): end of epoch {event.epoch}"


@dataclass(kw_only=True)
class EverySeconds(Trigger):
    """Save when `seconds` of wall time have passed since the last save (or the start)."""

    seconds: float
    """Wall-clock seconds between saves (the Transformer paper saved every 600)."""

    def __post_init__(self) -> None:
        self.seconds = check_number("EverySeconds.seconds", self.seconds, low=0, open_low=True)

    def fires(self, event: Event) -> bool:
        return event.seconds_since_save >= self.seconds

    def describe(self, event: Event) -> str:
        return f"EverySeconds(seconds={self.seconds:g}): {event.seconds_since_save:.1f} s since the last save"


@dataclass(kw_only=True)
class OnImprovement(Trigger):
    """Save when `metric` is strictly better than every value reported before."""

    metric: str
    """Name of the metric, as passed in `metrics=`."""
    mode: Mode | str = Mode.MIN
    """"min" (default) or "max": which direction is better."""
    best: float | None = field(default=None)

    def __post_init__(self) -> None:
        check_name("OnImprovement.metric", self.metric)
        self.mode = parse_mode(self.mode, field="OnImprovement.mode")

    def fires(self, event: Event) -> bool:
        value = event.metrics.get(self.metric)
        if value is None or not is_better(value, self.best, self.mode):
            return False
        self.best = float(value)
        return True

    def describe(self, event: Event) -> str:
        return f"OnImprovement: {self.metric}={self.best:g} is a new best ({Mode(self.mode).value})"

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.best = state.get("best")


@dataclass(kw_only=True)
class OnThreshold(Trigger):
    """Save the first time `metric` reaches each of `thresholds` (<= for "min", the default; >= for "max")."""

    metric: str
    """Name of the metric, as passed in `metrics=`."""
    thresholds: Sequence[float]
    """Values that each fire once when first reached."""
    mode: Mode | str = Mode.MIN
    """"min" (default): fires when the metric falls to a threshold; "max": when it rises to one."""
    crossed: list[float] = field(default_factory=list)
    _reached: list[float] = field(default_factory=list, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_name("OnThreshold.metric", self.metric)
        self.mode = parse_mode(self.mode, field="OnThreshold.mode")
        self.thresholds = sorted(check_numbers("OnThreshold.thresholds", self.thresholds))

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
        self._reached = reached
        return bool(reached)

    def describe(self, event: Event) -> str:
        value = float(event.metrics.get(self.metric))  # type: ignore[arg-type]
        reached = ", ".join(f"{t:g}" for t in self._reached)
        return f"OnThreshold: {self.metric}={value:g} reached {reached}"

    def state_dict(self) -> dict[str, Any]:
        return {"crossed": list(self.crossed)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.crossed = [float(t) for t in state.get("crossed", [])]


class Clock:
    """Seconds since the last save, on the monotonic clock (immune to wall-clock jumps).

    `now` is the time source: tests pass a fake one instead of patching `time.monotonic`.
    """

    def __init__(self, now: Callable[[], float] = time.monotonic) -> None:
        self.now = now
        self.last = now()

    def reset(self) -> None:
        self.last = self.now()

    def elapsed(self) -> float:
        return self.now() - self.last
