"""What `ladle verify` checks: every file of every checkpoint, and what is not a checkpoint.

Builds on `Run.verify()` (size and checksum against meta.json, then a parse of
each file: the safetensors header and every tensor's extent, a weights-only
unpickle). On top of that it names checkpoint folders the run cannot list
(an unreadable meta.json, weights without a meta.json) and files a checkpoint
holds that meta.json does not record, so nothing damaged goes unnoticed just
because the index skips it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ladle.errors import CheckpointNotFound, NotARunDirectory
from ladle.store.checkpoint import CheckpointInfo, load_meta
from ladle.store.checks import vanished, verify_checkpoint
from ladle.store.layout import INDEX_NAME, META_NAME
from ladle.store.paths import locate
from ladle.store.refs import is_run_dir
from ladle.store.run import Run
from ladle.store.storage import storage_for

# Files whose presence marks a folder as (part of) a checkpoint.
_CHECKPOINT_FILES = (".safetensors", ".pt", ".pth", ".bin")


@dataclass(kw_only=True, frozen=True)
class CheckpointCheck:
    """The result for one checkpoint folder."""

    name: str
    path: str
    step: int | None
    files: int
    nbytes: int
    problems: list[str] = field(default_factory=list)
    """One line per bad file, naming it; empty when all is well."""
    notes: list[str] = field(default_factory=list)
    """Things worth knowing that are not failures (files meta.json does not list)."""

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass(kw_only=True)
class Verification:
    """The result of verifying a run or one checkpoint."""

    path: str
    checkpoints: list[CheckpointCheck]

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checkpoints)

    @property
    def problems(self) -> list[str]:
        return [p for c in self.checkpoints for p in c.problems]

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "ok": self.ok,
            "checked": len(self.checkpoints),
            "bad": sum(not c.ok for c in self.checkpoints),
            "checkpoints": [
                {
                    "name": c.name,
                    "path": c.path,
                    "step": c.step,
                    "ok": c.ok,
                    "files": c.files,
                    "bytes": c.nbytes,
                    "problems": c.problems,
                    "notes": c.notes,
                }
                for c in self.checkpoints
            ],
        }


def verification_targets(path: str | os.PathLike[str]) -> tuple[Run, list[str]]:
    """The run and the checkpoint folder names to check for a run or checkpoint path (or URL)."""
    storage, text = storage_for(path)
    if not storage.exists(text):
        raise CheckpointNotFound(f"{text}: no such run or checkpoint; check the path")
    if not storage.isdir(text):
        raise NotARunDirectory(
            f"{text}: a file, not a run or a ladle checkpoint folder; verify checks checksums "
            "recorded by ladle (use `ladle inspect` to read a single file)"
        )
    if storage.isfile(storage.join(text, META_NAME)):
        parent, _, name = text.rstrip("/").rpartition("/")
        return Run(parent), [name]
    run = Run(text)
    names = [c.name for c in run.checkpoints()]
    listed = set(names)
    for name in storage.listdir(text):
        if name.startswith(".") or name in listed or not _looks_like_checkpoint(run, name):
            continue
        names.append(name)
    if not names and not storage.isfile(storage.join(text, INDEX_NAME)):
        raise NotARunDirectory(
            f"{text}: neither a ladle run nor a checkpoint folder (no meta.json, no {INDEX_NAME})"
        )
    return run, names


def _looks_like_checkpoint(run: Run, name: str) -> bool:
    folder = run.storage.join(run.path, name)
    if not run.storage.isdir(folder):
        return False
    try:
        files = run.storage.listdir(folder)
    except FileNotFoundError:  # deleted meanwhile
        return False
    return META_NAME in files or any(f.endswith(_CHECKPOINT_FILES) for f in files)


def check_checkpoint(run: Run, name: str, *, load: bool = True) -> CheckpointCheck:
    """Verify one checkpoint folder of `run` (listed or not)."""
    storage = run.storage
    folder = storage.join(run.path, name)
    info = next((c for c in run.checkpoints() if c.name == name), None)
    if info is None:
        return _unlisted(run, folder, name, load)
    return _check_listed(run, info, load)


def _check_listed(run: Run, info: CheckpointInfo, load: bool) -> CheckpointCheck:
    storage, name, folder = run.storage, info.name, info.path
    problems = verify_checkpoint(storage, info, load=load)
    if not problems and vanished(storage, info):
        # A writer's retention deleted it while it was checked: not corruption.
        notes = [f"{folder}: deleted while it was being verified (a writer's retention); not checked"]
    else:
        try:
            on_disk = set(storage.listdir(folder)) if storage.isdir(folder) else set()
        except FileNotFoundError:
            on_disk = set(info.files)
        extra = sorted(on_disk - set(info.files) - {META_NAME})
        notes = [f"{storage.join(folder, f)}: not recorded in meta.json (not checked)" for f in extra]
    return CheckpointCheck(
        name=name,
        path=folder,
        step=info.step,
        files=len(info.files),
        nbytes=info.size,
        problems=problems,
        notes=notes,
    )


# What only ladle's own checkpoint folders hold: the manager's state file, LadleCheckpoint's
# Lightning file; and its default folder name. Such a folder without meta.json is damaged.
_LADLE_FILES = ("state.pt", "lightning.ckpt")
_LADLE_NAME_RE = re.compile(r"^step-\d{9}(-\d+)?$")


def _ladle_made(name: str, files: list[str]) -> bool:
    return bool(_LADLE_NAME_RE.match(name)) or any(f in _LADLE_FILES for f in files)


def _has_provenance(files: list[str]) -> bool:
    names = set(files)
    return any(f.endswith(".json") and f[: -len(".json")] in names for f in files)


def _unlisted(run: Run, folder: str, name: str, load: bool) -> CheckpointCheck:
    """A folder that looks like a checkpoint but that the run cannot list."""
    storage = run.storage
    meta_path = storage.join(folder, META_NAME)
    try:
        files = storage.listdir(folder)
    except FileNotFoundError:
        return CheckpointCheck(
            name=name, path=folder, step=None, files=0, nbytes=0, notes=[f"{folder}: deleted meanwhile"]
        )
    nbytes = sum(
        storage.size(storage.join(folder, f)) for f in files if storage.isfile(storage.join(folder, f))
    )
    if not storage.isfile(meta_path) and not _ladle_made(name, files):
        # A soup written beside the run, a Trainer checkpoint not recorded, a user's export:
        # not ladle's, so never called damaged (nor suggested for deletion).
        what = "a soup or average (provenance beside it)" if _has_provenance(files) else "a folder of weights"
        return CheckpointCheck(
            name=name,
            path=folder,
            step=None,
            files=len(files),
            nbytes=nbytes,
            notes=[f"{folder}: {what}, not a ladle checkpoint (no meta.json); not checked"],
        )
    if not storage.isfile(meta_path):
        problem = (
            f"{meta_path}: missing, so {name} is not a checkpoint (an interrupted save or a "
            "damaged folder); ladle ignores it: delete it or restore its meta.json"
        )
    else:
        try:
            with storage.open(meta_path, "rb") as handle:
                info = load_meta(handle.read(), folder)
            if info.name == name:  # committed after the run was opened
                return _check_listed(run, info, load)
            problem = (
                f"{meta_path}: names the checkpoint {info.name!r}, not {name!r}; "
                "rename the folder back or restore its meta.json"
            )
        except (OSError, ValueError, KeyError, TypeError) as exc:
            problem = (
                f"{meta_path}: unreadable ({type(exc).__name__}: {str(exc)[:120]}), so ladle "
                "ignores this checkpoint; restore meta.json from a backup or delete the folder"
            )
    return CheckpointCheck(
        name=name, path=folder, step=None, files=len(files), nbytes=nbytes, problems=[problem]
    )


def verify_path(
    path: str | os.PathLike[str],
    *,
    load: bool = True,
    progress: Callable[[str, int, int], None] | None = None,
) -> Verification:
    """Verify a run (every checkpoint) or one checkpoint folder.

    `load=False` only recomputes sizes and checksums. `progress(name, done, total)`
    is called before each checkpoint (the CLI draws a progress bar with it).
    """
    plain_dcp = _plain_dcp_folders(path)
    if plain_dcp:
        return Verification(
            path=os.fspath(path), checkpoints=[_check_dcp_folder(folder, load) for folder in plain_dcp]
        )
    foreign = _foreign_run(path)
    if foreign is not None:
        return Verification(path=foreign.path, checkpoints=_check_foreign(foreign, load))
    run, names = verification_targets(path)
    checks = []
    for done, name in enumerate(names):
        if progress is not None:
            progress(name, done, len(names))
        checks.append(check_checkpoint(run, name, load=load))
    return Verification(path=storage_for(path)[1], checkpoints=checks)


def _plain_dcp_folders(path: str | os.PathLike[str]) -> list[str]:
    """A DCP folder written without ladle (no meta.json), or a folder of them (torchtitan's layout)."""
    text = os.fspath(path)
    if "://" in text or not os.path.isdir(text) or os.path.isfile(os.path.join(text, META_NAME)):
        return []
    if os.path.isfile(os.path.join(text, INDEX_NAME)):
        return []
    # Imported only past the checks above: ladle.formats imports torch, which a ladle run never needs here.
    from ladle.formats.dcp_metadata import is_dcp_dir

    if is_dcp_dir(text):
        return [text]
    inside = sorted(os.path.join(text, n) for n in os.listdir(text))
    if any(os.path.isfile(os.path.join(folder, META_NAME)) for folder in inside):
        return []
    return [folder for folder in inside if is_dcp_dir(folder)]


def _check_dcp_folder(folder: str, load: bool) -> CheckpointCheck:
    """A DCP folder has no recorded checksums: its metadata, shard extents and tensors are checked."""
    from ladle.formats.dcp import dcp_problems, folder_step
    from ladle.formats.dcp_metadata import shard_files

    files = [os.path.join(folder, ".metadata"), *shard_files(folder)]
    return CheckpointCheck(
        name=os.path.basename(os.path.normpath(folder)),
        path=folder,
        step=folder_step(folder),
        files=len(files),
        nbytes=sum(os.path.getsize(f) for f in files),
        problems=dcp_problems(folder, load=load),
        notes=[f"{folder}: a DCP folder without meta.json (no checksums); shards and tensors checked"],
    )


def _foreign_run(path: str | os.PathLike[str]) -> Any:
    """A Trainer, Lightning or timm output folder that is not a ladle run, else None."""
    from ladle.store.foreign_runs import ForeignRun, foreign_tool

    storage, text = locate(path)
    try:
        if not storage.isdir(text) or storage.isfile(storage.join(text, META_NAME)):
            return None  # not a folder, or one checkpoint
        # A ladle run is never foreign (a Trainer folder recorded in place by LadleCallback is one).
        if is_run_dir(text) or foreign_tool(text) is None:
            return None
    except OSError:
        return None
    return ForeignRun(text)


def _check_foreign(run: Any, load: bool) -> list[CheckpointCheck]:
    """Another tool's checkpoints: no checksums exist, so their weights are parsed (never called
    damaged for lacking ladle's meta.json)."""
    from ladle.store.foreign_runs import verify_foreign

    return [
        CheckpointCheck(
            name=check.info.name,
            path=check.info.path,
            step=check.info.step,
            files=len(check.info.files),
            nbytes=check.info.size,
            problems=check.problems,
            notes=check.notes,
        )
        for check in verify_foreign(run, load=load)
    ]
