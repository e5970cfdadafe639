"""`SaveEngine`: the one save path of ladle, shared by `CheckpointManager` and the integrations.

What every writer of a run needs, in one place:
- **metric recording** (`report`): metrics are validated and encoded (`ladle.metrics`)
  at the call, appended to the run's history log when there is one, accumulated
  per step, and metrics reported at the step of the newest checkpoint are added to
  its record (its meta.json is rewritten atomically), so `manager.best`,
  `EarlyStopping` and `ladle ls` see the same values;
- **trigger polling** (`poll`): every trigger sees every event (stateful ones
  must), on an injected clock; the reason of a save is logged at debug level;
- **the duplicate-save check** (`already_saved`) and **superseding**: a second
  save at the same step replaces the first once it is committed;
- **the commit** through `Run.begin` / `PendingCheckpoint`, then **retention**
  (`policies.retention.prune`, never before the new checkpoint is committed);
- **the monitor check**: the first save lacking the monitored metric warns,
  naming the metrics reported (a typo in `monitor=`); `SaveRules.strict_monitor`
  raises instead once an evaluation has reported other metrics;
- **logging**: one info line per committed checkpoint (name, trigger, size, seconds).

The seam for asynchronous and sharded saves. A save is a `SaveRequest`: the
checkpoint's name, a list of `(filename, writer)` pairs and the commit metadata.
`save()` runs three phases, each its own method:
1. *staging* happens before the request exists: the caller captures the state
   it will write (the manager builds its payload and weight dicts); for an
   asynchronous save the caller stages copies in host memory, so training can
   go on while they are written;
2. `_write(request)` opens the temporary checkpoint and runs each writer into it;
3. `_commit(pending, request)` writes meta.json and renames it into place
   (`PendingCheckpoint.commit`), and `_finish(...)` supersedes, logs and applies
   retention.
`save(request, background=True)` runs phases 2 and 3 on the engine's background
thread (`ladle.saving.async_save.BackgroundSaver`): at most one save is in flight,
the next save, `wait()` and `close()` wait for it, and its error is raised by the
next `check()`/`save()`/`wait()`. A request whose writers read state that may
change after the call (another tool's files) says `write_at_call=True`: phase 2
runs at the call, phase 3 in the background. A sharded (DCP) save gives each
rank its own writers in phase 2 and lets rank 0 alone run phase 3.

Threads. With a save in flight, the main thread keeps reporting metrics while
the background thread commits. Everything they share (the history log, the
newest checkpoint and the metrics reported at its step) is changed only under
the engine's lock, and the main thread never writes into the run while a save
is in flight: metrics reported at the in-flight checkpoint's step are queued
and added to its record by the background thread, right after its commit.
The lock is not held while files are written, hashed or fsynced.

The module is longer than most (about 600 lines) because it is one concept, the save
path: its phases, the background save and the lock over what the two threads share
must be read together to check that no state is changed by both.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ladle.errors import ConfigError
from ladle.metrics import MetricValue, encode_metrics
from ladle.policies.retention import prune
from ladle.policies.rules import SaveRules
from ladle.policies.triggers import Clock, Event, Trigger
from ladle.store.checkpoint import CheckpointInfo
from ladle.store.commit import PendingCheckpoint
from ladle.store.history import HistoryLog
from ladle.store.run import Run

if TYPE_CHECKING:
    from ladle.saving.async_save import BackgroundSaver

log = logging.getLogger("ladle")

FileWriter = Callable[[str], None]
"""Writes one file at the path it is given."""


@dataclass(frozen=True, kw_only=True)
class SaveRequest:
    """One checkpoint to write: its files (each written by a writer function) and its commit metadata."""

    name: str
    """The checkpoint's directory name in the run."""
    files: Sequence[tuple[str, FileWriter]]
    """(file name, writer) pairs; each writer writes its file at the path it is given."""
    step: int
    epoch: int | None
    metrics: Mapping[str, MetricValue]
    """Already encoded (`ladle.metrics.encode_metrics`)."""
    trigger: str
    """Why this save happens, for the log ("EverySteps(n=100): step 200", "save()", ...)."""
    pinned: bool = False
    extra: Mapping[str, Any] = field(default_factory=dict)
    before_commit: Callable[[], None] | None = None
    """Runs after the files are written, before meta.json (e.g. syncing the history log it counts)."""
    after_commit: Callable[[CheckpointInfo], None] | None = None
    """Runs after the commit and retention, on the thread that committed (e.g. a running soup)."""
    write_at_call: bool = False
    """For a background save: run the writers at the call (they read files that may change
    afterwards, e.g. a framework's own checkpoint folder); only the commit is in the background."""


class SaveEngine:
    """Decides when a run saves, commits checkpoints into it and keeps what retention says.

    `run_dir` is opened (created, locked) by `open()`; a caller that opened the run
    itself (the manager, which knows about distributed ranks) passes `run=`.
    `clock` is the time source of wall-time triggers (`time.monotonic`; tests pass
    a fake one). `takeover=True` lets `open()` close an earlier engine of this process
    on the same run (framework callbacks get no notice when training dies).
    """

    def __init__(
        self,
        run_dir: str | os.PathLike[str],
        rules: SaveRules,
        *,
        default_trigger: Trigger | None = None,
        run: Run | None = None,
        history: HistoryLog | None = None,
        clock: Callable[[], float] = time.monotonic,
        takeover: bool = False,
    ) -> None:
        if not isinstance(rules, SaveRules):
            raise ConfigError(f"rules={rules!r} is not allowed; use ladle.SaveRules(...)")
        self.run_dir = os.fspath(run_dir)
        self.rules = rules
        self.triggers: list[Trigger] = rules.build_triggers(default=default_trigger)
        self.run: Run | None = run
        self.history = history
        self.clock = Clock(clock)
        self.takeover = takeover
        self.last_saved: CheckpointInfo | None = None
        self.resumed_from: str | None = None
        self.protected: set[str] = set()
        """Names retention must keep besides latest, best and resumed-from (e.g. the Trainer's best)."""
        self._step_metrics: tuple[int, dict[str, MetricValue]] = (-1, {})
        self._reported: set[str] = set()
        self._evaluated = False
        self._monitor_warned = False
        self._lock = threading.RLock()
        """Guards what the main thread and the background save share (see the module docstring)."""
        self._background: BackgroundSaver | None = None
        self._in_flight: SaveRequest | None = None
        self._late: dict[str, MetricValue] = {}
        """Metrics reported at the in-flight checkpoint's step, added to its record once committed."""

    # -- lifecycle ---------------------------------------------------------------------

    def open(self) -> Run:
        """Create the run if needed and take its writer lock (idempotent)."""
        if self.run is None:
            self.run = Run(self.run_dir, create=True)
        if not self.run.writable:
            key = os.path.realpath(self.run.path)
            earlier = _OPEN.get(key)
            if self.takeover and earlier is not None and earlier is not self:
                log.warning("%s: closing the writer of an earlier training in this process", self.run.path)
                earlier.close()
            self.run.acquire()
            if self.takeover:
                _OPEN[key] = self
        return self.run

    def close(self) -> None:
        """Wait for the save in flight (raising its error), then give the writer lock back;
        the engine can be opened again."""
        try:
            if self._background is not None:
                background, self._background = self._background, None
                background.close()
        finally:
            if self.run is not None:
                self.run.release()
                key = os.path.realpath(self.run.path)
                if _OPEN.get(key) is self:
                    del _OPEN[key]

    # -- the background save -----------------------------------------------------------

    @property
    def in_flight(self) -> bool:
        """True while a background save is being written or committed."""
        return self._background is not None and self._background.in_flight

    def check(self) -> None:
        """Raise the error of a finished background save (`BackgroundSaveError`, once)."""
        if self._background is not None:
            self._background.check()

    def wait(self) -> None:
        """Block until the background save in flight (if any) is committed; raise its error."""
        if self._background is not None:
            self._background.wait()

    def _writable(self) -> Run:
        if self.run is None or not self.run.writable:
            return self.open()
        return self.run

    # -- metrics -----------------------------------------------------------------------

    def report(
        self,
        kind: str,
        step: int,
        epoch: int | None,
        metrics: Any,
        *,
        where: str = "metrics",
        lenient: bool = False,
        evaluation: bool | None = None,
        history: bool = True,
    ) -> dict[str, MetricValue]:
        """Record metrics reported at `step`; returns them encoded.

        Raises ConfigError naming `where` for a value that is not a number (unless
        `lenient`, which drops it). Metrics of one step accumulate; those reported at
        the step of the newest checkpoint this engine saved are added to its record.
        `evaluation` (default: `kind == "epoch"`) says an evaluation reported them;
        `history=False` keeps them out of the history log (metrics given to `save()`).
        """
        encoded = encode_metrics(metrics, where=where, lenient=lenient)
        current_step, current = self._step_metrics
        if current_step != step:
            current = {}
        current.update(encoded)
        self._step_metrics = (step, current)
        if not encoded:
            return encoded
        self._reported |= set(encoded)
        if evaluation if evaluation is not None else kind == "epoch":
            self._evaluated = True
        with self._lock:
            if history and self.history is not None:
                self.history.append(
                    {"kind": kind, "step": step, "epoch": epoch, "time": time.time(), "metrics": encoded}
                )
            in_flight = self._in_flight
            if in_flight is None:
                self._add_to_newest(step, encoded)
            elif in_flight.step == step:
                self._late.update(encoded)  # the background thread adds them once it has committed
        return encoded

    def note_evaluation(self, names: Iterable[str]) -> None:
        """An evaluation reported the metrics `names` (for frameworks that record no history)."""
        self._reported |= set(names)
        self._evaluated = True

    def metrics_at(self, step: int) -> dict[str, MetricValue]:
        """Every metric reported at `step` so far (empty for another step)."""
        current_step, current = self._step_metrics
        return dict(current) if current_step == step else {}

    def _add_to_newest(self, step: int, metrics: Mapping[str, MetricValue]) -> None:
        last = self.last_saved
        run = self.run
        if last is None or last.step != step or run is None or not run.writable:
            return
        if all(last.metrics.get(k) == v for k, v in metrics.items()):
            return
        latest = run.latest()
        if latest is None or latest.name != last.name:
            return  # a newer checkpoint exists (another writer's soup, a resume): leave history alone
        self.last_saved = run.add_metrics(last.name, metrics)
        log.debug("added %s to %s (reported at its step %d)", ", ".join(sorted(metrics)), last.name, step)

    # -- deciding ----------------------------------------------------------------------

    def poll(self, kind: str, step: int, epoch: int | None, metrics: Mapping[str, Any]) -> str | None:
        """Ask every trigger (stateful ones must all see the event); why a save is due, or None."""
        event = Event(kind, int(step), epoch, dict(metrics), self.clock.elapsed())  # type: ignore[arg-type]
        fired = [t for t in self.triggers if t.fires(event)]
        if not fired:
            return None
        reason = "; ".join(t.describe(event) for t in fired)
        log.debug("save due at step %d: %s", step, reason)
        return reason

    def already_saved(self, step: int, metrics: Mapping[str, Any], **extra: Any) -> bool:
        """True when the last save was at `step`, recorded every metric now known, and matches `extra`."""
        last = self.last_saved
        return (
            last is not None
            and last.step == step
            and all(k in last.metrics for k in metrics)
            and all(last.extra.get(k) == v for k, v in extra.items())
        )

    def _check_monitor(self, name: str, metrics: Mapping[str, Any]) -> None:
        monitor = self.rules.monitor
        if monitor is None or monitor in metrics or monitor in self._reported:
            return
        reported = ", ".join(sorted(self._reported | set(metrics))) or "none"
        message = (
            f"{self.run_dir}: checkpoint {name} has no monitored metric {monitor!r} "
            f"(metrics reported so far: {reported}); check monitor="
        )
        if self.rules.strict_monitor and self._evaluated:
            raise ConfigError(f"{message} (strict_monitor=True)")
        if not self._monitor_warned:
            self._monitor_warned = True
            log.warning("%s", message)

    # -- saving ------------------------------------------------------------------------

    def save(self, request: SaveRequest, *, background: bool = False) -> CheckpointInfo | None:
        """Write, commit, supersede, log and apply retention: one checkpoint, start to end.

        With `background`, the files must hold the state at the call (staged copies,
        or `write_at_call`): the write and commit run on the background thread and
        None is returned; `wait()` returns once it is committed.
        """
        self.wait()  # at most one save in flight, and saves commit in order
        self._check_monitor(request.name, request.metrics)
        started = time.monotonic()
        if not background:
            return self._save_now(request, started, None)
        pending = self._write(request) if request.write_at_call else None
        self._submit(request, lambda: self._save_now(request, started, pending))
        return None

    def _save_now(
        self, request: SaveRequest, started: float, pending: PendingCheckpoint | None
    ) -> CheckpointInfo:
        if pending is None:
            pending = self._write(request)
        info = self._commit(pending, request)
        self._finish(info, request.trigger, time.monotonic() - started)
        if request.after_commit is not None:
            request.after_commit(info)
        return info

    def _submit(self, request: SaveRequest, save: Callable[[], CheckpointInfo]) -> None:
        from ladle.saving.async_save import BackgroundSaver

        with self._lock:
            self._in_flight, self._late = request, {}

        def run() -> CheckpointInfo:
            info = None
            try:
                info = save()
                return info
            finally:
                # Until here (the after-commit work too) the main thread left the run alone.
                with self._lock:
                    late, self._in_flight, self._late = self._late, None, {}
                    if info is not None and late:  # a failed save leaves nothing to add them to
                        self._add_to_newest(info.step, late)

        if self._background is None:
            self._background = BackgroundSaver()
        self._background.submit(request.name, run)

    def save_sharded(
        self,
        request: SaveRequest,
        *,
        sharded: Any,
        per_rank: Mapping[str, Any],
        state: Any = None,
        background: bool = False,
    ) -> CheckpointInfo | None:
        """A sharded save (`ladle.saving.sharded.ShardedCheckpointer`), called on every rank.

        Every rank writes its part (`state`: its staged DCP state, default taken now);
        rank 0 (the run's writer) commits, then applies retention; a barrier before
        returning. `request.files` are written once, by rank 0. `background` as in
        `save()` (the collectives then run on `sharded.group`, a group of their own).
        """
        self.wait()
        writer = self.run is not None and self.run.writable
        if writer:
            self._check_monitor(request.name, request.metrics)
        started = time.monotonic()
        save = functools.partial(
            self._save_sharded_now, request, started, sharded=sharded, per_rank=per_rank, state=state
        )
        if not background:
            return save()
        self._submit(request, save)
        return None

    def _save_sharded_now(
        self, request: SaveRequest, started: float, *, sharded: Any, per_rank: Mapping[str, Any], state: Any
    ) -> CheckpointInfo:
        from ladle.saving.sharded import barrier

        writer = self.run is not None and self.run.writable
        assert self.run is not None
        info = sharded.save(
            self.run,
            request.name,
            once=request.files,
            per_rank=per_rank,
            commit={
                "step": request.step,
                "epoch": request.epoch,
                "metrics": request.metrics,
                "monitor": self.rules.monitor_spec,
                "pinned": request.pinned,
                "extra": request.extra,
            },
            before_commit=self._locked(request.before_commit),
            state=state,
        )
        if writer:
            self._finish(info, request.trigger, time.monotonic() - started)
        else:
            with self._lock:
                self.last_saved = info
                self.clock.reset()
        barrier(sharded.group)
        if request.after_commit is not None:
            request.after_commit(info)
        return info

    def _locked(self, call: Callable[[], None] | None) -> Callable[[], None] | None:
        """`call` run under the engine's lock (it touches what the main thread changes)."""
        if call is None:
            return None

        def locked() -> None:
            with self._lock:
                call()

        return locked

    def _write(self, request: SaveRequest) -> PendingCheckpoint:
        """Phase 2: the temporary checkpoint with every file written (nothing visible yet)."""
        pending = self._writable().begin(request.name)
        try:
            for filename, writer in request.files:
                pending.write(filename, writer)
        except BaseException:
            pending.abort()
            raise
        return pending

    def _commit(self, pending: PendingCheckpoint, request: SaveRequest) -> CheckpointInfo:
        """Phase 3a: meta.json written last, the directory renamed into place."""
        try:
            if request.before_commit is not None:
                with self._lock:
                    request.before_commit()
            return pending.commit(
                step=request.step,
                epoch=request.epoch,
                metrics=request.metrics,
                monitor=self.rules.monitor_spec,
                pinned=request.pinned,
                extra=request.extra,
            )
        except BaseException:
            pending.abort()
            raise

    def _finish(self, info: CheckpointInfo, trigger: str, seconds: float, *, supersede: bool = True) -> None:
        """Phase 3b: remember the save, add the metrics reported at its step meanwhile, log it,
        delete what it supersedes and what retention drops."""
        with self._lock:
            last = self.last_saved
            superseded = (
                last.name
                if supersede and last is not None and last.step == info.step and last.name != info.name
                else None
            )
            self.last_saved = info
            late, self._late = self._late, {}  # retention below sees them (KeepBest)
            self.clock.reset()
            log.info(
                "saved %s (%s; %s in %.2f s) in %s",
                info.name,
                trigger,
                _size(info.size),
                seconds,
                self.run_dir,
            )
            if late:
                self._add_to_newest(info.step, late)
            self.apply_retention(extra=[superseded] if superseded else [])

    def record(
        self,
        name: str,
        *,
        step: int,
        epoch: int | None,
        metrics: Mapping[str, Any],
        trigger: str = "framework save",
        extra: Mapping[str, Any] | None = None,
    ) -> CheckpointInfo:
        """Mark the finished directory `<run>/<name>` as a checkpoint: checksum its files, write meta.json.

        For frameworks that write their checkpoint directories in place (the
        transformers Trainer): meta.json is written last and atomically, so a
        directory the framework did not finish never counts as a checkpoint.
        """
        self.wait()
        started = time.monotonic()
        encoded = encode_metrics(metrics, where=f"{name}: metrics", lenient=True)
        self._check_monitor(name, encoded)
        run = self._writable()
        run.refresh()
        info = run.adopt(
            name, step=step, epoch=epoch, metrics=encoded, monitor=self.rules.monitor_spec, extra=extra
        )
        self._finish(info, trigger, time.monotonic() - started, supersede=False)
        return info

    def apply_retention(self, *, extra: Iterable[str] = (), protect: Iterable[str] = ()) -> list[str]:
        """Delete what no policy keeps (and `extra`), never the latest, best, resumed-from or pinned."""
        run = self._writable()
        with self._lock:
            run.refresh()
            rules = self.rules
            return prune(
                run,
                rules.policies(),
                monitor=(rules.monitor, rules.mode) if rules.monitor else None,
                protect={*protect, *self.protected, *([self.resumed_from] if self.resumed_from else [])},
                extra=extra,
            )

    def warn_if_monitor_unrecorded(self) -> None:
        """Warn when no checkpoint records the monitored metric: most likely a misspelt `monitor=`."""
        monitor = self.rules.monitor
        if monitor is None or self.run is None:
            return
        trains = self.run.checkpoints(kind="train")
        if trains and not any(monitor in c.metrics for c in trains):
            recorded = sorted({k for c in trains for k in c.metrics})
            log.warning(
                "%s: no checkpoint records the monitored metric %r (recorded: %s); check monitor=",
                self.run_dir,
                monitor,
                ", ".join(recorded) or "none",
            )

    # -- the engine's own state (saved with each checkpoint) ---------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "triggers": [t.state_dict() for t in self.triggers],
            "trigger_types": [type(t).__name__ for t in self.triggers],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the triggers' memory; triggers that differ from the saved ones (in number or
        kind) warn and start fresh."""
        saved = list(state.get("triggers") or [])
        types = [type(t).__name__ for t in self.triggers]
        saved_types = state.get("trigger_types", types)  # older checkpoints recorded no types
        if len(saved) == len(self.triggers) and list(saved_types) == types:
            for trigger, trigger_state in zip(self.triggers, saved, strict=True):
                trigger.load_state_dict(trigger_state)
        else:
            log.warning(
                "the checkpoint holds the state of %d triggers (%s) but %d are configured (%s); "
                "triggers start fresh",
                len(saved),
                ", ".join(map(str, saved_types)) or "none",
                len(self.triggers),
                ", ".join(types) or "none",
            )
        self.clock.reset()


_OPEN: weakref.WeakValueDictionary[str, SaveEngine] = weakref.WeakValueDictionary()
"""The open engine of each run in this process that allows a takeover, by real path."""


def _size(nbytes: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if nbytes < 1000 or unit == "GB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1000  # type: ignore[assignment]
    return f"{nbytes} B"


def safetensors_writer(tensors: Mapping[str, Any], aliases: Mapping[str, str] | None = None) -> FileWriter:
    """A writer of `tensors` as one safetensors file; `aliases` (tied names, from
    `tensors_for_safetensors`) go into its metadata and are re-tied on load."""
    import json

    from safetensors.torch import save_file

    from ladle.state.model_weights import ALIASES_KEY

    metadata = {"format": "pt"}
    if aliases:
        metadata[ALIASES_KEY] = json.dumps(dict(aliases))
    owned = dict(tensors)

    def write(path: str) -> None:
        save_file(owned, path, metadata=metadata)

    return write
