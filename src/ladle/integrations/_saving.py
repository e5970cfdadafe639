"""`RunWriter`: committing checkpoints that a training framework writes into a ladle run.

Lightning and the transformers Trainer produce their own checkpoint files; what
ladle adds is *how* they are kept (an atomic commit with checksums into a run
directory, or a commit marker written into a folder the framework finished) and
*what survives* (retention that never deletes the latest, the best or the
checkpoint a run resumed from). Both callbacks share this writer; it is built on
the public `Run` API (`acquire`, `begin`, `write`, `commit`, `delete`) and
asks the triggers of its `SaveRules` when to save.
"""

from __future__ import annotations

import json
import logging
import os
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ladle.metrics import is_finite_number
from ladle.policies.retention import prune
from ladle.policies.rules import SaveRules
from ladle.policies.triggers import Clock, Event, Trigger
from ladle.state.model_weights import ALIASES_KEY, tensors_for_safetensors
from ladle.store.run import CheckpointInfo, Run

log = logging.getLogger("ladle")

FileWriter = Callable[[str], None]
"""Writes one file at the path it is given."""


def safetensors_writer(state_dict: Mapping[str, Any]) -> FileWriter:
    """A writer of `state_dict` as safetensors with its keys unchanged; tied tensors stored once
    (their other names go into the file's metadata, as `CheckpointManager` writes them)."""
    from safetensors.torch import save_file

    tensors, aliases = tensors_for_safetensors(dict(state_dict))
    metadata = {"format": "pt"}
    if aliases:
        metadata[ALIASES_KEY] = json.dumps(aliases)

    def write(path: str) -> None:
        save_file(tensors, path, metadata=metadata)

    return write


@dataclass(eq=False)
class RunWriter:
    """Writes framework-produced checkpoints into one run; holds the run's writer lock while open."""

    run_dir: str
    rules: SaveRules
    default_trigger: Trigger | None = None
    triggers: list[Trigger] = field(init=False)
    run: Run | None = field(init=False, default=None)
    last_saved: CheckpointInfo | None = field(init=False, default=None)
    resumed_from: str | None = field(init=False, default=None)
    protected: set[str] = field(init=False, default_factory=set)
    """Names retention must keep besides latest, best and resumed-from (e.g. the Trainer's best)."""
    clock: Clock = field(init=False, default_factory=Clock)

    def __post_init__(self) -> None:
        self.run_dir = os.fspath(self.run_dir)
        self.triggers = self.rules.build_triggers(default=self.default_trigger)

    # -- lifecycle ---------------------------------------------------------------

    def open(self) -> Run:
        """Create the run if needed and take its writer lock (idempotent).

        An earlier writer of this process on the same run is closed first: a
        framework gives a callback no notice when training dies of an exception
        (the transformers Trainer has no such hook), so in a notebook the lock of
        the failed attempt would otherwise refuse the next one.
        """
        if self.run is None:
            self.run = Run(self.run_dir, create=True)
        if not self.run.writable:
            key = os.path.realpath(self.run.path)
            earlier = _OPEN.get(key)
            if earlier is not None and earlier is not self:
                log.warning("%s: closing the writer of an earlier training in this process", self.run.path)
                earlier.close()
            self.run.acquire()
            _OPEN[key] = self
        return self.run

    def close(self) -> None:
        """Give the writer lock back; the writer can be opened again."""
        if self.run is not None:
            self.run.release()
            key = os.path.realpath(self.run.path)
            if _OPEN.get(key) is self:
                del _OPEN[key]

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: nothing useful to report
            pass

    def _writable(self) -> Run:
        if self.run is None or not self.run.writable:
            return self.open()
        return self.run

    # -- deciding ----------------------------------------------------------------

    def fires(self, kind: str, step: int, epoch: int | None, metrics: Mapping[str, Any]) -> bool:
        """Ask every trigger (stateful ones must all see the event); True if any fires."""
        event = Event(kind, int(step), epoch, dict(metrics), self.clock.elapsed())  # type: ignore[arg-type]
        fired = [trigger.fires(event) for trigger in self.triggers]
        return any(fired)

    def already_saved(self, step: int, metrics: Mapping[str, Any]) -> bool:
        """True when the last save was at `step` and already recorded every metric now known."""
        last = self.last_saved
        return last is not None and last.step == step and all(k in last.metrics for k in metrics)

    # -- writing -----------------------------------------------------------------

    def free_name(self, base: str) -> str:
        """`base`, or `base-1`, `base-2`, ... when a checkpoint of that name exists (a resumed run)."""
        return self._writable().free_name(base)

    def commit(
        self,
        name: str,
        files: Sequence[tuple[str, FileWriter]],
        *,
        step: int,
        epoch: int | None,
        metrics: Mapping[str, Any],
        extra: Mapping[str, Any] | None = None,
    ) -> CheckpointInfo:
        """Write `files` into a new checkpoint `name` atomically, then apply retention."""
        run = self._writable()
        pending = run.begin(name)
        try:
            for filename, writer in files:
                pending.write(filename, writer)
            info = pending.commit(
                step=step,
                epoch=epoch,
                metrics=_plain_metrics(metrics),
                monitor=self.rules.monitor_spec,
                extra=extra,
            )
        except BaseException:
            pending.abort()
            raise
        self._saved(info)
        return info

    def record(
        self,
        name: str,
        *,
        step: int,
        epoch: int | None,
        metrics: Mapping[str, Any],
        extra: Mapping[str, Any] | None = None,
    ) -> CheckpointInfo:
        """Mark the finished directory `<run>/<name>` as a checkpoint: checksum its files, write meta.json.

        For frameworks that write their checkpoint directories in place (the
        transformers Trainer): meta.json is written last and atomically, so a
        directory the framework did not finish never counts as a checkpoint.
        """
        run = self._writable()
        run.refresh()
        info = run.adopt(
            name,
            step=step,
            epoch=epoch,
            metrics=_plain_metrics(metrics),
            monitor=self.rules.monitor_spec,
            extra=extra,
        )
        self._saved(info, supersede=False)
        return info

    def _saved(self, info: CheckpointInfo, *, supersede: bool = True) -> None:
        last = self.last_saved
        superseded = (
            last.name
            if supersede and last is not None and last.step == info.step and last.name != info.name
            else None
        )
        self.last_saved = info
        self.clock.reset()
        log.info("saved %s (step %d) in %s", info.name, info.step, self.run_dir)
        self.apply_retention(extra=[superseded] if superseded else [])

    def apply_retention(self, *, extra: Iterable[str] = (), protect: Iterable[str] = ()) -> list[str]:
        """Delete what no policy keeps (and `extra`), never the latest, best, resumed-from or pinned."""
        run = self._writable()
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

    # -- the writer's own state (saved by the framework with its checkpoint) --------

    def state_dict(self) -> dict[str, Any]:
        return {"triggers": [t.state_dict() for t in self.triggers]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        saved = list(state.get("triggers") or [])
        if len(saved) == len(self.triggers):
            for trigger, trigger_state in zip(self.triggers, saved, strict=True):
                trigger.load_state_dict(trigger_state)
        else:
            log.warning(
                "the checkpoint holds the state of %d triggers but %d are configured; triggers start fresh",
                len(saved),
                len(self.triggers),
            )
        self.clock.reset()


_OPEN: weakref.WeakValueDictionary[str, RunWriter] = weakref.WeakValueDictionary()
"""The open writer of each run in this process, by real path."""


def _plain_metrics(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """Scalar metrics as plain JSON values; others dropped.

    Tensors and numpy scalars are unwrapped; NaN and inf become strings, as the
    run store records them (JSON has no such numbers, and they never count as best).
    """
    out: dict[str, Any] = {}
    for key, value in metrics.items():
        if hasattr(value, "numel") and callable(value.numel) and value.numel() != 1:
            continue
        if hasattr(value, "item"):
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        out[str(key)] = value if is_finite_number(value) else str(float(value))
    return out
