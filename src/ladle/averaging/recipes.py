"""Soup recipes: which checkpoints of a run go into an average, and why.

A `Recipe` is a selection rule (`Uniform`, `Last`, `Top`, `Improved`, `Greedy`) and an
optional `Window`; its string form (`last:5`, `top:5:val_loss:min@epoch:13-50`, ...) is
parsed by `ladle.averaging.recipe_parsing.parse_recipe`, and `str()` gives it back.

"Improved" has two meanings; pick with `over=`:
- `over=best` (default): a new running best, i.e. strictly better than every
  earlier checkpoint of the run on that metric (the first checkpoint with a
  finite value counts); what a save-on-improvement callback would have kept.
- `over=previous`: strictly better than the checkpoint just before it (in
  step order; the first checkpoint counts).
Both are judged against the whole run's history, before the window selects;
missing and non-finite values never count as improvements.

Warm-up: a run's first checkpoints always "improve" (the first value of a
metric beats nothing), so without a window `improved` leaves out the first
quarter of the run's checkpoints (rounded up; `warmup=0.25`, the default).
They still set the running best. With a window (`@epoch:13-50`, the BirdCLEF
form) the window decides and no warm-up applies; `:warmup=0` turns it off.

Greedy acceptance (`accept=`), how a candidate joins the soup:
- `no-worse` (default): the soup's score with it is not worse (Wortsman's
  `>=`); on a small validation set ties are common and it accepts nearly all.
- `better`: strictly better.
- `halves`: strictly better on the whole validation set and on both halves
  of each of 10 seeded random splits of it; needs per-example values from
  evaluate (see `ladle.averaging.greedy`). The choice for small validation sets.

A recipe whose metric no checkpoint recorded (a typo) is refused, naming the
metrics that were recorded.

A window, by step or epoch and inclusive at both ends, narrows any recipe.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

from ladle.errors import ConfigError, EmptySelection
from ladle.metrics import Mode, is_better, is_finite_number, parse_mode, sort_key
from ladle.store.checkpoint import CheckpointInfo

log = logging.getLogger("ladle")


def _order(info: CheckpointInfo) -> tuple[int, int, str]:
    return (info.step, info.seq, info.name)


class WindowBy(str, Enum):
    """What a window counts in."""

    STEP = "step"
    EPOCH = "epoch"


@dataclass(frozen=True, kw_only=True)
class Window:
    """Checkpoints whose step (or epoch) lies in [start, end]; an open end is None."""

    by: WindowBy
    """Count in steps or in epochs."""
    start: int | None = None
    """First step/epoch included (None: from the beginning)."""
    end: int | None = None
    """Last step/epoch included (None: to the end)."""

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "by", WindowBy(self.by))
        except ValueError:
            raise ConfigError(f"window by={self.by!r} is not known; use 'step' or 'epoch'") from None
        if self.start is not None and self.end is not None and self.start > self.end:
            raise ConfigError(f"window {self}: start {self.start} is after end {self.end}")

    def contains(self, info: CheckpointInfo) -> bool:
        value = info.step if self.by is WindowBy.STEP else info.epoch
        if value is None:
            return False
        return (self.start is None or value >= self.start) and (self.end is None or value <= self.end)

    def __str__(self) -> str:
        lo = "" if self.start is None else str(self.start)
        hi = "" if self.end is None else str(self.end)
        if self.start is not None and self.start == self.end:
            return f"{self.by.value}:{lo}"
        return f"{self.by.value}:{lo}-{hi}"


class Selector:
    """Base of the recipes' selection rules."""

    needs_evaluate = False

    def select(self, history: Sequence[CheckpointInfo], window: Window | None) -> list[CheckpointInfo]:
        """The chosen checkpoints, oldest first; `history` is every training checkpoint, oldest first."""
        raise NotImplementedError


def _windowed(history: Sequence[CheckpointInfo], window: Window | None) -> list[CheckpointInfo]:
    if window is None:
        return list(history)
    if window.by is WindowBy.EPOCH and all(c.epoch is None for c in history):
        raise ConfigError(f"window {window}: no checkpoint records an epoch; use a step window")
    return [c for c in history if window.contains(c)]


def _check_recorded(history: Sequence[CheckpointInfo], metrics: Sequence[str], recipe: object) -> None:
    """Refuse a metric that no checkpoint of the run recorded (a typo, not an empty window)."""
    if not history:
        return
    recorded = {name for c in history for name in c.metrics}
    for metric in metrics:
        if metric not in recorded:
            raise ConfigError(
                f"no checkpoint recorded {metric!r}; recorded: {', '.join(sorted(recorded)) or 'no metrics'} "
                f"(recipe {recipe}: fix the metric name)"
            )


@dataclass(frozen=True, kw_only=True)
class Uniform(Selector):
    """Every checkpoint in the window."""

    def select(self, history: Sequence[CheckpointInfo], window: Window | None) -> list[CheckpointInfo]:
        return _windowed(history, window)

    def __str__(self) -> str:
        return "uniform"


@dataclass(frozen=True, kw_only=True)
class Last(Selector):
    """The `k` newest checkpoints."""

    k: int
    """How many; fewer available means all of them (with a warning)."""

    def __post_init__(self) -> None:
        _positive(self.k, "last:K")

    def select(self, history: Sequence[CheckpointInfo], window: Window | None) -> list[CheckpointInfo]:
        pool = _windowed(history, window)
        if 0 < len(pool) < self.k:
            log.warning(
                "last:%d: only %d checkpoints to choose from; averaging all of them", self.k, len(pool)
            )
        return sorted(pool, key=_order)[-self.k :]

    def __str__(self) -> str:
        return f"last:{self.k}"


@dataclass(frozen=True, kw_only=True)
class Top(Selector):
    """The `k` best checkpoints by a recorded metric (ties: the earlier one)."""

    k: int
    """How many."""
    metric: str | None = None
    """The recorded metric; None means the run's monitored metric."""
    mode: Mode | None = None
    """"min" or "max"; None only together with metric=None."""

    def __post_init__(self) -> None:
        _positive(self.k, "top:K")
        if self.mode is not None:
            object.__setattr__(self, "mode", parse_mode(self.mode, field="top mode"))
        if (self.metric is None) != (self.mode is None):
            raise ConfigError(f"top:{self.k}: give both a metric and min|max (top:K:METRIC:min|max)")

    def resolved(self, monitor: dict[str, str] | None) -> Top:
        """This recipe with the run's monitored metric filled in."""
        if self.metric is not None:
            return self
        if not monitor:
            raise ConfigError(
                f"top:{self.k} needs a metric: the run records no monitor; write top:{self.k}:METRIC:min|max"
            )
        return Top(k=self.k, metric=monitor["metric"], mode=parse_mode(monitor["mode"]))

    def select(self, history: Sequence[CheckpointInfo], window: Window | None) -> list[CheckpointInfo]:
        if self.metric is None or self.mode is None:
            raise ConfigError(
                f"top:{self.k} has no metric: resolve the run's monitor first (Top.resolved(run.monitor)) "
                f"or write top:{self.k}:METRIC:min|max"
            )
        _check_recorded(history, [self.metric], self)
        pool = _windowed(history, window)
        scored = [c for c in pool if is_finite_number(c.metrics.get(self.metric))]
        if len(scored) < len(pool):
            log.info("top:%d: %d checkpoints lack %r", self.k, len(pool) - len(scored), self.metric)
        if 0 < len(scored) < self.k:
            log.warning(
                "top:%d: only %d checkpoints record %r; averaging all of them",
                self.k,
                len(scored),
                self.metric,
            )
        metric, mode = self.metric, self.mode
        best = sorted(scored, key=lambda c: (sort_key(c.metrics[metric], mode), c.seq))[: self.k]
        return sorted(best, key=_order)

    def __str__(self) -> str:
        if self.metric is None:
            return f"top:{self.k}"
        return f"top:{self.k}:{self.metric}:{self.mode.value}"  # type: ignore[union-attr]


class Over(str, Enum):
    """What "improved" compares with."""

    BEST = "best"
    """A new running best over every earlier checkpoint."""
    PREVIOUS = "previous"
    """Better than the checkpoint just before."""


WARMUP = 0.25
"""Default share of a run's first checkpoints that `improved` leaves out when no window is given."""


@dataclass(frozen=True, kw_only=True)
class Improved(Selector):
    """Checkpoints that improved on at least one of several metrics (see the module docstring)."""

    metrics: tuple[tuple[str, Mode], ...]
    """(metric, direction) pairs; a checkpoint counts if any of them improved."""
    over: Over = Over.BEST
    """Improved on the running best ("best") or on the previous checkpoint ("previous")."""
    warmup: float = WARMUP
    """Share of the run's first checkpoints (rounded up) never selected when no window is given."""

    def __post_init__(self) -> None:
        if not self.metrics:
            raise ConfigError("improved: list at least one metric, e.g. improved:auc:max")
        object.__setattr__(
            self, "metrics", tuple((str(m), parse_mode(d, field=f"improved {m}")) for m, d in self.metrics)
        )
        try:
            object.__setattr__(self, "over", Over(self.over))
        except ValueError:
            raise ConfigError(f"improved over={self.over!r} is not known; use 'best' or 'previous'") from None
        ok = isinstance(self.warmup, int | float) and not isinstance(self.warmup, bool)
        if not ok or not 0 <= self.warmup < 1:
            raise ConfigError(f"improved warmup={self.warmup!r} must be a fraction with 0 <= warmup < 1")

    def improvements(self, history: Sequence[CheckpointInfo]) -> dict[str, list[str]]:
        """For each checkpoint name, the metrics it improved (empty when none); no warm-up applied."""
        ordered = sorted(history, key=_order)
        best: dict[str, float | None] = {m: None for m, _ in self.metrics}
        previous: CheckpointInfo | None = None
        out: dict[str, list[str]] = {}
        for info in ordered:
            improved = []
            for metric, mode in self.metrics:
                value = info.metrics.get(metric)
                if not is_finite_number(value):
                    continue
                if self.over is Over.BEST:
                    if is_better(value, best[metric], mode):
                        improved.append(metric)
                        best[metric] = float(value)
                elif previous is None or is_better(value, previous.metrics.get(metric), mode):
                    improved.append(metric)
            out[info.name] = improved
            previous = info
        return out

    def select(self, history: Sequence[CheckpointInfo], window: Window | None) -> list[CheckpointInfo]:
        _check_recorded(history, [m for m, _ in self.metrics], self)
        found = self.improvements(history)
        pool = _windowed(history, window)
        if window is None and self.warmup > 0:
            skip = math.ceil(self.warmup * len(pool))
            warm, pool = sorted(pool, key=_order)[:skip], sorted(pool, key=_order)[skip:]
            chosen = [c for c in pool if found.get(c.name)]
            if not chosen and any(found.get(c.name) for c in warm):
                raise EmptySelection(
                    f"recipe {self}: every checkpoint that improved lies in the warm-up (the first {skip} "
                    f"of {skip + len(pool)}); give a window (@epoch:A-B) or a shorter warm-up (:warmup=0.1)"
                )
            return chosen
        return [c for c in pool if found.get(c.name)]

    def __str__(self) -> str:
        spec = ",".join(f"{m}:{d.value}" for m, d in self.metrics)
        suffix = "" if self.over is Over.BEST else f":over={self.over.value}"
        if self.warmup != WARMUP:
            suffix += f":warmup={self.warmup:g}"
        return f"improved:{spec}{suffix}"


class Accept(str, Enum):
    """How a greedy search decides that a candidate joins the soup."""

    NO_WORSE = "no-worse"
    """The soup's score with it is not worse (Wortsman et al.'s `>=`)."""
    BETTER = "better"
    """Strictly better."""
    HALVES = "halves"
    """Strictly better on the whole set and on both halves of each of several random splits of it."""


@dataclass(frozen=True, kw_only=True)
class Greedy(Selector):
    """Wortsman et al. 2022: add candidates best-first while the held-out score does not get worse."""

    metric: str
    """The metric the evaluate function returns."""
    mode: Mode
    """"max" when higher is better, "min" when lower is."""
    accept: Accept = Accept.NO_WORSE
    """The acceptance rule: "no-worse" (Wortsman's default), "better" or "halves"."""

    needs_evaluate = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "mode", parse_mode(self.mode, field="greedy mode"))
        if not self.metric:
            raise ConfigError("greedy: name the metric, e.g. greedy:val_acc:max")
        try:
            object.__setattr__(self, "accept", Accept(self.accept))
        except ValueError:
            raise ConfigError(
                f"greedy accept={self.accept!r} is not known; use no-worse, better or halves"
            ) from None

    def select(self, history: Sequence[CheckpointInfo], window: Window | None) -> list[CheckpointInfo]:
        """The candidates; the search itself runs in `ladle.soup` with the evaluate function."""
        return _windowed(history, window)

    def __str__(self) -> str:
        suffix = "" if self.accept is Accept.NO_WORSE else f":accept={self.accept.value}"
        return f"greedy:{self.metric}:{self.mode.value}{suffix}"


@dataclass(frozen=True, kw_only=True)
class Recipe:
    """A selection rule and an optional window."""

    select: Selector
    """Which checkpoints."""
    window: Window | None = None
    """Narrows the candidates by step or epoch."""

    def __str__(self) -> str:
        return f"{self.select}@{self.window}" if self.window else str(self.select)

    def choose(self, history: Sequence[CheckpointInfo]) -> list[CheckpointInfo]:
        """The selected checkpoints of `history`, oldest first."""
        return self.select.select(sorted(history, key=_order), self.window)


def _positive(k: object, field: str) -> None:
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ConfigError(f"{field}: K={k!r} must be a whole number of at least 1")
