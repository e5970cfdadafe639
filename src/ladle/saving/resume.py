"""Resuming a manager's run: which checkpoint, the fallback past corrupt ones, and loading it.

`resume(manager, which, ...)` finds the checkpoint (`find_checkpoint`: "latest",
"best", a name, a step, a path or a reference such as `RUN/best`), reads and
checks everything it holds before any live object changes, then loads it into
the manager's registered objects. A full checkpoint (safetensors weights +
`state.pt`) and a sharded one (DCP shards + `state.pt` + each rank's own file,
`ladle.saving.sharded`) differ only in how they are read; what follows the read
(the objects' states, the manager's counters, extras, RNG, the history lineage)
is one tail, `_apply`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ladle.errors import CheckpointNotFound, ConfigError, CorruptCheckpoint
from ladle.metrics import Mode
from ladle.saving.payload import apply_states
from ladle.saving.sharded import is_sharded_checkpoint
from ladle.state.model_weights import load_model_weights
from ladle.state.readers import EMA_NAME, check_saved_objects, read_checkpoint, read_state
from ladle.state.rng import restore_rng
from ladle.store.checkpoint import CheckpointInfo
from ladle.store.run import Run

if TYPE_CHECKING:
    from ladle.saving.manager import CheckpointManager

log = logging.getLogger("ladle")


@dataclass(frozen=True)
class ResumePoint:
    """Where a resumed run continues.

    `step` is the step value the checkpoint was saved with (steps completed);
    `epoch` is the epoch to run next: the interrupted one when the save happened
    mid-epoch, the following one when it happened at `epoch_end`.
    """

    step: int
    epoch: int
    checkpoint: CheckpointInfo
    mid_epoch: bool


@dataclass(frozen=True)
class _Read:
    """A checkpoint read and checked, not yet applied: what `_apply` needs of either layout."""

    payload: dict[str, Any] | None
    in_files: set[str]
    """Objects whose state is in the weight files or DCP shards, not in the payload."""
    load_files: Callable[[], None]
    """Loads those files into the live objects."""
    rng: Mapping[str, Any] | None
    ema_weights: Mapping[str, Any] | None


def resume(
    manager: CheckpointManager,
    which: str | int,
    *,
    fallback: bool,
    strict: bool,
    verify: bool,
    restore_rng: bool,
) -> ResumePoint | None:
    """`CheckpointManager.resume`: find, read, check, then load; None for "latest" of an empty run."""
    run = manager.run
    info = find_checkpoint(run, which, manager.monitor, manager.mode)
    if info is None:
        return None
    tried: list[str] = []
    while True:
        try:
            point = _load(manager, info, strict=strict, verify=verify, rng=restore_rng)
            break
        except CorruptCheckpoint as exc:
            if not fallback:
                raise
            tried.append(info.name)
            older = [c for c in run.checkpoints(kind="train") if c.seq < info.seq and c.name not in tried]
            if not older or not in_run(run, info):
                raise CorruptCheckpoint(
                    f"{exc}; no earlier good checkpoint to fall back to (tried {', '.join(tried)})"
                ) from exc
            info = max(older, key=lambda c: c.seq)
            log.warning("%s; falling back to %s", exc, info.name)
    engine = manager.engine
    engine.resumed_from = info.name if in_run(run, info) else None
    engine.last_saved = info if engine.resumed_from else None
    engine.clock.reset()
    return point


def find_checkpoint(run: Run, which: str | int, monitor: str | None, mode: Mode) -> CheckpointInfo | None:
    """The checkpoint `which` names; None when `which="latest"`/"best" and the run is empty."""
    if which == "latest":
        return run.latest()
    if which == "best":
        if monitor is None:
            raise ConfigError("resume('best') needs monitor='metric name' on the manager")
        if not run.checkpoints():
            return None
        best = run.best(monitor, mode)
        if best is None:
            raise CheckpointNotFound(f"{run.path}: no checkpoint has a finite {monitor!r}; resume 'latest'")
        return best
    if isinstance(which, str) and ("/" in which or "@" in which or which.startswith(".")):
        # A checkpoint folder or a reference (RUN/best, RUN@1200): ladle.store.refs parses both.
        from ladle.store.refs import find_checkpoint as find_reference

        found = find_reference(which)
        if found is None:
            raise CheckpointNotFound(
                f"{which}: not a checkpoint directory (no meta.json) nor a reference such as "
                "RUN/latest, RUN/best or RUN@STEP; pass one of those, a name, or 'latest'/'best'"
            )
        if in_run(run, found):
            run.refresh()
            return run.get(found.name)
        return found
    return run.get(which)


def in_run(run: Run, info: CheckpointInfo) -> bool:
    """Whether `info` is a checkpoint of `run` (not of another run named by path)."""
    return parent_of(info.path) == run.path


def parent_of(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[0]


def _load(
    manager: CheckpointManager, info: CheckpointInfo, *, strict: bool, verify: bool, rng: bool
) -> ResumePoint:
    run = manager.run if in_run(manager.run, info) else Run(parent_of(info.path))
    read = (
        _read_sharded(manager, run, info, verify=verify)
        if is_sharded_checkpoint(info)
        else _read_full(manager, run, info, strict=strict, verify=verify)
    )
    if read.payload is not None or not is_sharded_checkpoint(info):
        live = [n for n in manager.objects if n not in read.in_files]
        check_saved_objects(info, read.payload, live, strict=strict)
    return _apply(manager, info, read, rng=rng)


def _read_full(
    manager: CheckpointManager, run: Run, info: CheckpointInfo, *, strict: bool, verify: bool
) -> _Read:
    """Safetensors weights (one file per model, the EMA) and `state.pt`."""
    contents = read_checkpoint(
        run.storage, info, manager._models(), strict=strict, verify=verify, ema=EMA_NAME in manager.objects
    )

    def load_files() -> None:
        for name, weights in contents.models.items():
            load_model_weights(manager.objects[name], weights, strict=strict)

    payload = contents.payload
    return _Read(
        payload=payload,
        in_files=set(contents.models),
        load_files=load_files,
        rng=payload["rng"] if payload is not None else None,
        ema_weights=contents.ema,
    )


def _read_sharded(manager: CheckpointManager, run: Run, info: CheckpointInfo, *, verify: bool) -> _Read:
    """DCP shards (models, optimizers; DCP reshards to this job's ranks), `state.pt` and this rank's file."""
    checkpointer = manager._checkpointer()
    checkpointer.verify(run, info, verify=verify)
    payload = read_state(run.storage, info)
    rank_payload = checkpointer.rank_payload(run, info)
    if payload is not None:
        payload = {**payload, "objects": {**payload["objects"], **rank_payload.get("objects", {})}}
    return _Read(
        payload=payload,
        in_files={*checkpointer.models, *checkpointer.optimizers},
        load_files=lambda: checkpointer.load_into(info),
        rng=rank_payload.get("rng"),
        ema_weights=checkpointer.ema_weights(),  # the EMA's own tensors, which `load_files` fills
    )


def _apply(manager: CheckpointManager, info: CheckpointInfo, read: _Read, *, rng: bool) -> ResumePoint:
    """Everything is read and checked: only now change the live objects."""
    read.load_files()
    payload = read.payload
    if payload is not None:
        saved = payload["objects"]
        apply_states(
            manager.objects, saved, skip=read.in_files, ema_weights=read.ema_weights, where=info.path
        )
        manager.load_state_dict(saved["manager"])
        manager.extras = dict(payload.get("extras") or {})
    else:  # weights only (a checkpoint written without state.pt)
        manager.global_step, manager.epoch, manager.epoch_complete = info.step, info.epoch or 0, True
    if rng and read.rng is not None:
        restore_rng(read.rng)
    manager._history.restart_from(
        info.name if in_run(manager.run, info) else None, info.extra.get("history_len")
    )
    epoch = manager.epoch + 1 if manager.epoch_complete else manager.epoch
    log.info("resumed from %s (step %d)", info.name, manager.global_step)
    return ResumePoint(
        step=manager.global_step, epoch=epoch, checkpoint=info, mid_epoch=not manager.epoch_complete
    )
