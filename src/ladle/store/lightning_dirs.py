"""Lightning `ModelCheckpoint` output: `*.ckpt` files, their steps and monitored scores.

The files sit in the folder given or under its `checkpoints/` (a `lightning_logs/version_N`
folder). The step and epoch are in each file (`global_step`, `epoch`), the monitored
score in the callback's own saved state (`current_score`), and `key=value` parts of file
names (`epoch=3-val_loss=0.41.ckpt`) are metrics too; `last.ckpt` is dropped when another
file holds the same step. Files load weights-only, without Lightning; on a store only
their pickle and scores are read, by ranged requests (`_scan_remote`), never the weights.
`ladle.store.foreign_runs` presents the folder as a run.
"""

from __future__ import annotations

import ast
import logging
import os
import re
from dataclasses import dataclass, field
from typing import Any

from ladle.metrics import is_finite_number
from ladle.store.checkpoint import CheckpointInfo, size_records
from ladle.store.paths import locate, path_mtime
from ladle.store.storage import is_url

log = logging.getLogger("ladle")

LIGHTNING = "lightning"
_LIGHTNING_SUFFIX = ".ckpt"
_LIGHTNING_LAST_RE = re.compile(r"^last(-v\d+)?\.ckpt$")
# `epoch=3-step=120-val_loss=0.41.ckpt`: `=`-separated pairs; values may hold `.` and `-`.
_NAME_PAIR_RE = re.compile(r"([A-Za-z_][\w/.]*?)=(-?\d+(?:\.\d+)?(?:e-?\d+)?)(?=-[A-Za-z_]|\.ckpt$|$)")
# File-name pairs that are counters or settings, not metrics.
_NOT_METRICS = frozenset({"epoch", "step", "lr"})


def lightning_folder(path: str) -> str | None:
    """The folder holding a Lightning run's `.ckpt` files: `path` or its `checkpoints/` (a path or
    URL)."""
    storage, where = locate(path)
    for folder in (where, storage.join(where, "checkpoints")):
        try:
            if any(n.endswith(_LIGHTNING_SUFFIX) for n in storage.listdir(folder)):
                return folder
        except OSError:
            continue
    return None


def _callback_mode(key: str) -> str | None:
    """The mode of a `ModelCheckpoint{'monitor': ..., 'mode': 'min', ...}` state key."""
    _, brace, rest = key.partition("{")
    if not key.startswith("ModelCheckpoint") or not brace:
        return None
    try:
        spec = ast.literal_eval("{" + rest)
    except (ValueError, SyntaxError):
        return None
    mode = spec.get("mode") if isinstance(spec, dict) else None
    return mode if mode in ("min", "max") else None


def _score(value: Any) -> float | None:
    item = getattr(value, "item", None)
    if callable(item):
        try:
            value = item()
        except (RuntimeError, ValueError):
            return None
    if isinstance(value, bool) or not is_finite_number(value):
        return None
    return float(value)


def name_metrics(filename: str) -> dict[str, float]:
    """`key=value` pairs of a Lightning file name (`epoch=3-val_loss=0.41.ckpt`), epoch/step left out."""
    found = {}
    for key, value in _NAME_PAIR_RE.findall(filename):
        if key not in _NOT_METRICS:
            found[key] = float(value)
    return found


@dataclass(kw_only=True)
class _LightningFile:
    path: str
    step: int
    epoch: int | None
    metrics: dict[str, float] = field(default_factory=dict)
    monitor: dict[str, str] | None = None


def _read_lightning(path: str) -> _LightningFile | None:
    """Step, epoch, monitored scores of one `.ckpt` (loaded weights-only; tensors stay in the file;
    on a store, see `_scan_remote`)."""
    from ladle.formats.safe_globals import weights_only_load

    try:
        obj = _scan_remote(path) if is_url(path) else weights_only_load(path, mmap=True)
    except Exception as exc:  # an unreadable file is reported by verify; listing goes on
        log.warning("%s: not readable weights-only (%s); skipped", path, str(exc).splitlines()[0][:120])
        return None
    if not isinstance(obj, dict) or "state_dict" not in obj:
        return None
    step = obj.get("global_step")
    epoch = obj.get("epoch")
    metrics = name_metrics(os.path.basename(path))
    monitor = None
    for key, state in (obj.get("callbacks") or {}).items():
        if not isinstance(state, dict) or not state.get("monitor"):
            continue
        score = _score(state.get("current_score"))
        if score is not None:
            metrics[str(state["monitor"])] = score
        mode = _callback_mode(str(key))
        if monitor is None and mode is not None:
            monitor = {"metric": str(state["monitor"]), "mode": mode}
    return _LightningFile(
        path=path,
        step=step if isinstance(step, int) and not isinstance(step, bool) else -1,
        epoch=epoch if isinstance(epoch, int) and not isinstance(epoch, bool) else None,
        metrics=metrics,
        monitor=monitor,
    )


def _scan_remote(path: str) -> Any:
    """A `.ckpt` on a store, read as far as listing needs, never whole: its pickle replayed
    without running code (tensors stay stand-ins) over ranged reads, and the callbacks' scores
    (one-element tensors) read from their few bytes."""
    from ladle.state.pickle_scan import TensorStub, TorchArchive

    with TorchArchive(path) as archive:
        obj = archive.scan().obj
        for state in (obj.get("callbacks") or {}).values() if isinstance(obj, dict) else ():
            if isinstance(state, dict) and isinstance(state.get("current_score"), TensorStub):
                state["current_score"] = archive.scalar(state["current_score"])
    return obj


def lightning_checkpoints(path: str) -> tuple[list[CheckpointInfo], dict[str, str] | None]:
    """Lightning `.ckpt` files, oldest first, and the first `ModelCheckpoint`'s monitor."""
    folder = lightning_folder(path)
    if folder is None:
        return [], None
    storage, where = locate(folder)
    names = [n for n in storage.listdir(where) if n.endswith(_LIGHTNING_SUFFIX)]
    files = [_read_lightning(storage.join(where, n)) for n in sorted(names)]
    read = [f for f in files if f is not None]
    steps = {f.step for f in read if not _LIGHTNING_LAST_RE.match(os.path.basename(f.path))}
    monitor = next((f.monitor for f in read if f.monitor), None)
    found = []
    for f in read:
        name = os.path.basename(f.path)
        if _LIGHTNING_LAST_RE.match(name) and f.step in steps:
            continue  # saved again beside the newest checkpoint: the same weights
        found.append(
            CheckpointInfo(
                name=name,
                path=f.path,
                step=max(f.step, 0),
                epoch=f.epoch,
                time=path_mtime(f.path),
                metrics=f.metrics,
                files=size_records([f.path]),
                kind="train",
                extra={"framework": LIGHTNING},
            )
        )
    found.sort(key=lambda c: (c.step, c.time, c.name))
    return found, monitor
