"""Soup recipes: which checkpoints of a run go into an average.

Recipe strings (the same in Python and on the command line; `str()` gives
the canonical form back):

    uniform                          every training checkpoint (in the window)
    last:K                           the K newest (the Transformer paper averaged the last 5, or 20)
    top:K:METRIC:min|max             the K best by a recorded metric (`top:K` uses the run's monitor)
    improved:SPEC[:over=best|previous]
                                     the checkpoints that improved at least one metric of SPEC
    greedy:METRIC:min|max            Wortsman et al. 2022, needs an evaluate function
    window:epoch:13-50               alias of uniform@epoch:13-50

SPEC lists metrics with directions: `loss:min,auc:max`, or a group sharing the
direction written after it: `lrap,cmap,f1,auc:max` (each metric without one
takes the next direction to its right).

"Improved" has two meanings; pick with `over=`:
- `over=best` (default): a new running best, i.e. strictly better than every
  earlier checkpoint of the run on that metric (the first checkpoint with a
  finite value counts); what a save-on-improvement callback would have kept.
- `over=previous`: strictly better than the checkpoint just before it (in
  step order; the first checkpoint counts).
Both are judged against the whole run's history, before the window selects;
missing and non-finite values never count as improvements.

A window, by step or epoch and inclusive at both ends, narrows any recipe:
append `@epoch:13-50` or `@step:1000-` to the string, or pass it separately
(`window=`, `--window`).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

from ladle.errors import ConfigError
from ladle.metrics import Mode, is_better, is_finite_number, parse_mode, sort_key
from ladle.store.run import CheckpointInfo

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


_WINDOW_RE = re.compile(r"^(step|epoch)s?[:=](\d*)(?:(-|\.\.)(\d*))?$")


def parse_window(text: str | Window | None) -> Window | None:
    """`epoch:13-50`, `step:1000-`, `epoch:-50`, `epoch:7` (None stays None)."""
    if text is None or isinstance(text, Window):
        return text
    match = _WINDOW_RE.match(text.strip())
    if not match or (not match.group(2) and not match.group(4)):
        raise ConfigError(f"window {text!r} not understood; write epoch:13-50, step:1000- or epoch:-50")
    by, lo, sep, hi = match.groups()
    start = int(lo) if lo else None
    end = int(hi) if hi else (start if sep is None else None)
    return Window(by=WindowBy(by), start=start, end=end)


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
        assert self.metric is not None and self.mode is not None, "resolve the monitor first"
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


@dataclass(frozen=True, kw_only=True)
class Improved(Selector):
    """Checkpoints that improved on at least one of several metrics (see the module docstring)."""

    metrics: tuple[tuple[str, Mode], ...]
    """(metric, direction) pairs; a checkpoint counts if any of them improved."""
    over: Over = Over.BEST
    """Improved on the running best ("best") or on the previous checkpoint ("previous")."""

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

    def improvements(self, history: Sequence[CheckpointInfo]) -> dict[str, list[str]]:
        """For each checkpoint name, the metrics it improved (empty when none)."""
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
        found = self.improvements(history)
        return [c for c in _windowed(history, window) if found.get(c.name)]

    def __str__(self) -> str:
        spec = ",".join(f"{m}:{d.value}" for m, d in self.metrics)
        suffix = "" if self.over is Over.BEST else f":over={self.over.value}"
        return f"improved:{spec}{suffix}"


@dataclass(frozen=True, kw_only=True)
class Greedy(Selector):
    """Wortsman et al. 2022: add candidates best-first while the held-out score does not get worse."""

    metric: str
    """The metric the evaluate function returns."""
    mode: Mode
    """"max" when higher is better, "min" when lower is."""

    needs_evaluate = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "mode", parse_mode(self.mode, field="greedy mode"))
        if not self.metric:
            raise ConfigError("greedy: name the metric, e.g. greedy:val_acc:max")

    def select(self, history: Sequence[CheckpointInfo], window: Window | None) -> list[CheckpointInfo]:
        """The candidates; the search itself runs in `ladle.soup` with the evaluate function."""
        return _windowed(history, window)

    def __str__(self) -> str:
        return f"greedy:{self.metric}:{self.mode.value}"


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


def _int(text: str, field: str) -> int:
    if not text.isdigit():
        raise ConfigError(f"{field}: {text!r} is not a whole number")
    return int(text)


def parse_improved(spec: str) -> Improved:
    """`loss:min,auc:max`, `lrap,cmap:max`, with an optional `:over=best|previous`."""
    over = Over.BEST
    match = re.search(r":over=(\w+)$", spec)
    if match:
        try:
            over = Over(match.group(1))
        except ValueError:
            raise ConfigError(
                f"improved: over={match.group(1)!r} is not known; use best or previous"
            ) from None
        spec = spec[: match.start()]
    pairs: list[tuple[str, Mode]] = []
    pending: list[str] = []
    for item in spec.split(","):
        name, _, direction = item.strip().partition(":")
        if not name:
            raise ConfigError(f"improved:{spec}: an empty metric name")
        pending.append(name)
        if direction:
            mode = parse_mode(direction, field=f"improved {name}")
            pairs.extend((p, mode) for p in pending)
            pending = []
    if pending:
        raise ConfigError(
            f"improved:{spec}: no direction for {', '.join(pending)}; end with :min or :max "
            "(e.g. improved:lrap,cmap:max or improved:loss:min,auc:max)"
        )
    return Improved(metrics=tuple(pairs), over=over)


def parse_recipe(text: str | Recipe, window: str | Window | None = None) -> Recipe:
    """A `Recipe` from its string (see the module docstring), with an optional extra window."""
    extra = parse_window(window)
    if isinstance(text, Recipe):
        recipe = text
    else:
        recipe = _parse(text.strip())
    if extra is not None:
        if recipe.window is not None and recipe.window != extra:
            raise ConfigError(
                f"recipe {recipe} has window {recipe.window}; do not give a second one ({extra})"
            )
        recipe = Recipe(select=recipe.select, window=extra)
    return recipe


def _parse(text: str) -> Recipe:
    body, at, window_text = text.partition("@")
    window = parse_window(window_text) if at else None
    head, _, rest = body.partition(":")
    parts = rest.split(":") if rest else []
    usage = {
        "last": "last:K",
        "top": "top:K:METRIC:min|max",
        "greedy": "greedy:METRIC:min|max",
        "improved": "improved:M1,M2,...:min|max",
    }
    try:
        if head == "uniform" and not parts:
            return Recipe(select=Uniform(), window=window)
        if head == "window" and rest:
            if window is not None:
                raise ConfigError(f"recipe {text!r}: two windows")
            return Recipe(select=Uniform(), window=parse_window(rest))
        if head == "last" and len(parts) == 1:
            return Recipe(select=Last(k=_int(parts[0], "last:K")), window=window)
        if head == "top" and len(parts) == 1:
            return Recipe(select=Top(k=_int(parts[0], "top:K")), window=window)
        if head == "top" and len(parts) == 3:
            k = _int(parts[0], "top:K")
            return Recipe(
                select=Top(k=k, metric=parts[1], mode=parse_mode(parts[2], field="top mode")), window=window
            )
        if head == "greedy" and len(parts) == 2:
            return Recipe(
                select=Greedy(metric=parts[0], mode=parse_mode(parts[1], field="greedy mode")), window=window
            )
        if head == "improved" and rest:
            return Recipe(select=parse_improved(rest), window=window)
    except ConfigError as exc:
        raise ConfigError(f"recipe {text!r}: {exc}") from None
    if head in usage:
        raise ConfigError(f"recipe {text!r}: write {usage[head]}")
    raise ConfigError(
        f"recipe {text!r} not understood; use uniform, last:K, top:K:METRIC:min|max, "
        "improved:M1,M2:min|max, greedy:METRIC:min|max or window:epoch:A-B"
    )
