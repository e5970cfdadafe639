"""Which checkpoints to keep: a union of small policies over minimal records.

Each policy looks at `(name, step, seq, metrics)` records and names the ones it
keeps; a checkpoint survives if any policy keeps it or it is protected (latest,
best, resumed-from, pinned). With no policies at all, everything is kept.

A metric that no checkpoint ever recorded (a mistyped `monitor=`) never decides a
deletion: `KeepBest` then keeps every checkpoint and says so in the log, so the
checkpoints the user meant to keep survive until the name is fixed. Direction:
`mode` defaults to "min" (a loss), as everywhere in ladle.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ladle.errors import ConfigError
from ladle.metrics import Mode, is_finite_number, parse_mode, sort_key
from ladle.store.checkpoint import best_of
from ladle.validation import check_int, check_name, check_optional_int

if TYPE_CHECKING:
    from ladle.store.run import Run

log = logging.getLogger("ladle")


@dataclass(frozen=True)
class Record:
    """What retention may look at for one checkpoint."""

    name: str
    step: int
    seq: int
    metrics: Mapping[str, Any]
    pinned: bool = False


class Policy:
    """Base class: the names of the records this policy keeps."""

    def keep(self, records: Sequence[Record]) -> set[str]:
        raise NotImplementedError


@dataclass(frozen=True, kw_only=True)
class KeepLast(Policy):
    """Keep the `n` most recently committed checkpoints."""

    n: int
    """How many of the newest to keep."""

    def __post_init__(self) -> None:
        check_int("KeepLast.n", self.n, low=1)

    def keep(self, records: Sequence[Record]) -> set[str]:
        newest = sorted(records, key=lambda r: r.seq)[-self.n :]
        return {r.name for r in newest}


@dataclass(frozen=True, kw_only=True)
class KeepBest(Policy):
    """Keep the `k` checkpoints with the best finite value of `metric` (ties: earlier wins).

    When no record holds `metric` at all, it keeps every record: a metric that was
    never reported (a typo) must not decide what is deleted; the save engine warns
    about such a metric at the first save that lacks it.
    """

    k: int
    """How many of the best to keep."""
    metric: str
    """Metric name as recorded in meta.json."""
    mode: Mode | str = Mode.MIN
    """"min" (default) or "max": which direction is better."""

    def __post_init__(self) -> None:
        check_int("KeepBest.k", self.k, low=1)
        check_name("KeepBest.metric", self.metric)
        object.__setattr__(self, "mode", parse_mode(self.mode, field="KeepBest.mode"))

    def keep(self, records: Sequence[Record]) -> set[str]:
        if records and not any(self.metric in r.metrics for r in records):
            log.info(
                "KeepBest: no checkpoint records %r (recorded: %s); keeping them all until one does",
                self.metric,
                ", ".join(sorted({k for r in records for k in r.metrics})) or "none",
            )
            return {r.name for r in records}
        scored = [r for r in records if is_finite_number(r.metrics.get(self.metric))]
        scored.sort(key=lambda r: (sort_key(r.metrics[self.metric], self.mode), r.seq))
        return {r.name for r in scored[: self.k]}


@dataclass(frozen=True, kw_only=True)
class KeepEvery(Policy):
    """Keep every checkpoint whose step is a multiple of `steps`, forever."""

    steps: int
    """Step interval of permanent checkpoints."""

    def __post_init__(self) -> None:
        check_int("KeepEvery.steps", self.steps, low=1)

    def keep(self, records: Sequence[Record]) -> set[str]:
        return {r.name for r in records if r.step % self.steps == 0}


@dataclass(frozen=True, kw_only=True)
class KeepPinned(Policy):
    """Keep checkpoints pinned by the user."""

    def keep(self, records: Sequence[Record]) -> set[str]:
        return {r.name for r in records if r.pinned}


@dataclass(frozen=True, kw_only=True)
class Keep:
    """Sugar over the policies: `Keep(last=3, best=5, metric="val_loss", mode="min", every=10000)`.

    Where rules take a `keep=`, a plain int `n` means `Keep(last=n)` (like the
    transformers Trainer's `save_total_limit`).
    """

    last: int | None = None
    """Keep the newest `last` checkpoints."""
    best: int | None = None
    """Keep the `best` best by `metric` (defaults to the manager's monitored metric)."""
    metric: str | None = None
    """Metric for `best`."""
    mode: Mode | str | None = None
    """Direction for `best`; default: the manager's `mode` with its monitor, else "min"."""
    every: int | None = None
    """Keep checkpoints at steps that are multiples of `every`, forever."""

    def __post_init__(self) -> None:
        check_optional_int("Keep.last", self.last, low=1)
        check_optional_int("Keep.best", self.best, low=1)
        check_optional_int("Keep.every", self.every, low=1)
        if self.metric is not None:
            check_name("Keep.metric", self.metric)
        if self.mode is not None:
            object.__setattr__(self, "mode", parse_mode(self.mode, field="Keep.mode"))
        if self.best is None and (self.metric is not None or self.mode is not None):
            raise ConfigError(
                f"Keep(metric={self.metric!r}, mode={self.mode!r}) without best= keeps nothing by that "
                "metric; add best=K (how many of the best to keep) or drop metric=/mode="
            )
        if self.last is None and self.best is None and self.every is None:
            raise ConfigError("Keep() names no policy; pass last=, best= and/or every= (keep=None keeps all)")

    def policies(self, monitor: tuple[str, Mode] | None = None) -> list[Policy]:
        """The policy objects this shorthand stands for."""
        found: list[Policy] = []
        if self.last is not None:
            found.append(KeepLast(n=self.last))
        if self.best is not None:
            metric, mode = self.metric, self.mode
            if metric is None and monitor is not None:
                metric, mode = monitor[0], mode or monitor[1]
            if metric is None:
                raise ConfigError(
                    "Keep(best=...) needs metric= (or a manager monitor=); e.g. metric='val_loss'"
                )
            found.append(KeepBest(k=self.best, metric=metric, mode=mode or Mode.MIN))
        if self.every is not None:
            found.append(KeepEvery(steps=self.every))
        return found


def to_delete(records: Sequence[Record], policies: Iterable[Policy], protected: Iterable[str]) -> list[str]:
    """Names to delete: not kept by any policy (nor pinned), and not protected."""
    policies = list(policies)
    if not policies:
        return []
    kept = set(protected) | KeepPinned().keep(records)
    for policy in policies:
        kept |= policy.keep(records)
    return [r.name for r in sorted(records, key=lambda r: r.seq) if r.name not in kept]


def prune(
    run: Run,
    policies: Sequence[Policy],
    *,
    monitor: tuple[str, Mode | str] | None = None,
    protect: Iterable[str] = (),
    extra: Iterable[str] = (),
) -> list[str]:
    """Delete a run's training checkpoints that no policy keeps, plus `extra`; returns their names.

    Never deleted: the latest, the best by `monitor`, pinned checkpoints and `protect`
    (e.g. the checkpoint the run resumed from). Called only after a commit, so the
    newest checkpoint is already safe on disk.
    """
    trains = run.checkpoints(kind="train")
    records = [Record(c.name, c.step, c.seq, c.metrics, c.pinned) for c in trains]
    protected = set(protect)
    latest = run.latest(kind="train")
    if latest is not None:
        protected.add(latest.name)
    extra = set(extra)
    if monitor is not None:
        # A superseded checkpoint (in `extra`) is replaced by a newer one of the same step
        # that records all its metrics: the best is chosen among the others.
        best = best_of([c for c in run.checkpoints() if c.name not in extra], monitor[0], monitor[1])
        if best is not None:
            protected.add(best.name)
    names = {r.name for r in records}
    pinned = {r.name for r in records if r.pinned}
    doomed = set(to_delete(records, policies, protected))
    doomed |= ({n for n in extra if n in names} - protected) - pinned
    if doomed:
        log.info("retention deletes %s", ", ".join(sorted(doomed)))
        run.delete(sorted(doomed))
    return sorted(doomed)
