"""Output folders of other tools, read as read-only runs: transformers Trainer, Lightning, timm, DCP.

Users have checkpoints where their training tool put them. Each tool leaves a
recognisable folder, and each records metrics somewhere ladle can read without
running the tool; one module reads each:

- transformers `Trainer`: `checkpoint-<step>/` folders, metrics in each one's
  `trainer_state.json` (`ladle.store.trainer_dirs`);
- Lightning `ModelCheckpoint`: `*.ckpt` files, step, epoch and monitored scores
  inside them and in their names (`ladle.store.lightning_dirs`);
- timm `CheckpointSaver`: `checkpoint-<epoch>.pth.tar` files with per-epoch metrics
  in `summary.csv` (`ladle.store.timm_dirs`);
- `torch.distributed.checkpoint` folders (torchtitan, `dcp.save`): here, by the step
  in their names.

`ForeignRun(path)` presents any of them to `ladle.soup`, `ladle ls` and
`ladle verify` like a ladle run whose checkpoints cannot be committed to and
carry no checksums. `verify_foreign` checks what can be checked without
checksums (weights parse, shards complete) and never calls a folder damaged
because it lacks ladle's marker.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace

from ladle.errors import FormatError, LadleError, RunNotFound
from ladle.store.checkpoint import CheckpointInfo, size_records
from ladle.store.lightning_dirs import LIGHTNING, lightning_checkpoints, lightning_folder
from ladle.store.paths import locate
from ladle.store.storage import is_url, storage_for
from ladle.store.timm_dirs import TIMM, is_timm_folder, timm_checkpoints
from ladle.store.trainer_dirs import holds_trainer_checkpoints, trainer_checkpoints

log = logging.getLogger("ladle")

TRANSFORMERS = "transformers"
DCP = "dcp"
DCP_METADATA = ".metadata"
ON_STORES = frozenset({TRANSFORMERS, TIMM, LIGHTNING})
"""The tools whose output folders are read in place on a store (s3://, gs://, ...)."""


def foreign_tool(path: str | os.PathLike[str]) -> str | None:
    """Which tool wrote the output folder `path` ("transformers", "lightning", "timm"), else None.

    Callers ask `ladle.store.refs.is_run_dir` first: a ladle run is never foreign.
    """
    try:
        storage, where = locate(path)
        if not storage.isdir(where):
            return None
        names = storage.listdir(where)
        if holds_trainer_checkpoints(storage, where, names):
            return TRANSFORMERS
        if is_timm_folder(names):
            return TIMM
        if lightning_folder(where) is not None:
            return LIGHTNING
        if _dcp_folders(where):
            return DCP
    except OSError:
        return None
    return None


# -- torch.distributed.checkpoint (torchtitan, Lightning's ModelParallelStrategy, dcp.save) --


def _dcp_folders(path: str) -> list[str]:
    """`path` itself when it is a DCP folder (`.metadata` beside `*.distcp`), else its DCP subfolders
    (a path or URL)."""
    storage, where = locate(path)
    if storage.isfile(storage.join(where, DCP_METADATA)):
        return [where]
    try:
        inside = [storage.join(where, n) for n in storage.listdir(where)]
    except OSError:
        return []
    return [f for f in inside if storage.isfile(storage.join(f, DCP_METADATA))]


def dcp_checkpoints(path: str) -> list[CheckpointInfo]:
    """DCP folders (torchtitan's `checkpoint/step-<N>/`), by the step in their names, then mtime."""
    from ladle.formats.dcp import folder_step
    from ladle.formats.dcp_metadata import shard_files

    found = []
    for folder in _dcp_folders(path):
        files = [os.path.join(folder, DCP_METADATA), *shard_files(folder)]
        step = folder_step(folder)
        found.append(
            CheckpointInfo(
                name=os.path.basename(os.path.normpath(folder)),
                path=folder,
                step=-1 if step is None else step,
                epoch=None,
                time=os.path.getmtime(files[0]),
                metrics={},
                files=size_records(files),
                kind="train",
                extra={"framework": DCP},
            )
        )
    return sorted(found, key=lambda c: (c.step, c.time, c.name))


# -- every tool -----------------------------------------------------------------------


class ForeignRun:
    """Another tool's output folder seen as a read-only run (what `ladle.soup`, `ls`, `verify` read).

    `tool` says which wrote it; `checkpoints()` lists them oldest first;
    `monitor` is Lightning's `ModelCheckpoint` metric and mode when recorded
    (else None, so `top:K` needs `top:K:METRIC:min|max`). Nothing can be
    committed into it.
    """

    def __init__(self, path: str | os.PathLike[str], tool: str | None = None) -> None:
        storage, self.path = storage_for(path)
        if not storage.isdir(self.path):
            raise RunNotFound(f"{self.path}: no such directory; pass the training tool's output folder")
        found = tool or foreign_tool(self.path)
        if found is None:
            raise FormatError(
                f"{self.path}: not an output folder of transformers, Lightning or timm "
                "(no checkpoint-<step>/, *.ckpt or checkpoint-<epoch>.pth.tar); pass a ladle run"
            )
        if is_url(self.path) and found not in ON_STORES:
            # DCP folders are read with torch's local file reader.
            raise FormatError(
                f"{self.path}: a {found} output folder on a store; ladle reads {found} folders on a "
                "local disk only: copy it to one (e.g. `aws s3 sync`) and pass the copy"
            )
        self.tool = found
        self._monitor: dict[str, str] | None = None
        self._cache: list[CheckpointInfo] | None = None

    @property
    def monitor(self) -> dict[str, str] | None:
        """Lightning's `ModelCheckpoint` metric and mode, when its files record one."""
        self.checkpoints()
        return self._monitor

    def checkpoints(self, kind: str | None = None) -> list[CheckpointInfo]:
        """Its checkpoints, oldest first (all of kind "train")."""
        if kind not in (None, "train"):
            return []
        if self._cache is None:
            if self.tool == TRANSFORMERS:
                found = trainer_checkpoints(self.path)
            elif self.tool == TIMM:
                found = timm_checkpoints(self.path)
            elif self.tool == DCP:
                found = dcp_checkpoints(self.path)
            else:
                found, self._monitor = lightning_checkpoints(self.path)
            if not found:
                raise FormatError(f"{self.path}: a {self.tool} output folder without checkpoints")
            self._cache = [replace(c, seq=i + 1) for i, c in enumerate(found)]
        return list(self._cache)

    def latest(self) -> CheckpointInfo | None:
        found = self.checkpoints()
        return found[-1] if found else None

    def __repr__(self) -> str:
        return f"ForeignRun({self.path!r}, tool={self.tool!r})"


class TrainerOutput(ForeignRun):
    """A transformers Trainer output directory seen as a read-only run."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        super().__init__(path, tool=TRANSFORMERS)


# -- verify ---------------------------------------------------------------------------


@dataclass(kw_only=True, frozen=True)
class ForeignCheck:
    """What could be checked of one checkpoint of another tool (no checksums exist)."""

    info: CheckpointInfo
    problems: list[str]
    notes: list[str]


def verify_foreign(run: ForeignRun, *, load: bool = True) -> list[ForeignCheck]:
    """Check that every checkpoint's weights parse (safetensors headers and extents, shard
    indexes complete, pickles load weights-only); the tool records no checksums to compare."""
    from ladle.formats import load_source

    note = f"no checksums: written by {run.tool}, which records none; " + (
        "checked that its weights parse" if load else "nothing checked (--quick)"
    )
    checks = []
    for info in run.checkpoints():
        problems: list[str] = []
        if load:
            try:
                with load_source(info.path):
                    pass
            except LadleError as exc:
                problems.append(str(exc))
        checks.append(ForeignCheck(info=info, problems=problems, notes=[note]))
    return checks


__all__ = [
    "DCP",
    "TRANSFORMERS",
    "ForeignCheck",
    "ForeignRun",
    "TrainerOutput",
    "dcp_checkpoints",
    "foreign_tool",
    "verify_foreign",
]
