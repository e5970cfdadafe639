"""What `ladle verify` checks: every file of every checkpoint, and what is not a checkpoint.

Builds on `Run.verify()` (size and sha256 against meta.json, then a parse of
each file: the safetensors header and every tensor's extent, a weights-only
unpickle). On top of that it names checkpoint folders the run cannot list
(an unreadable meta.json, weights without a meta.json) and files a checkpoint
holds that meta.json does not record, so nothing damaged goes unnoticed just
because the index skips it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ladle.errors import CheckpointNotFound, NotARunDirectory
from ladle.store.run import (
    INDEX_NAME,
    META_NAME,
    CheckpointInfo,
    Run,
    verify_checkpoint,
)
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
    files = run.storage.listdir(folder)
    return META_NAME in files or any(f.endswith(_CHECKPOINT_FILES) for f in files)


def check_checkpoint(run: Run, name: str, *, load: bool = True) -> CheckpointCheck:
    """Verify one checkpoint folder of `run` (listed or not)."""
    storage = run.storage
    folder = storage.join(run.path, name)
    info = next((c for c in run.checkpoints() if c.name == name), None)
    if info is None:
        return _unlisted(run, folder, name)
    problems = verify_checkpoint(storage, info, load=load)
    on_disk = set(storage.listdir(folder)) if storage.isdir(folder) else set()
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


def _unlisted(run: Run, folder: str, name: str) -> CheckpointCheck:
    """A folder that looks like a checkpoint but that the run cannot list."""
    storage = run.storage
    meta_path = storage.join(folder, META_NAME)
    files = storage.listdir(folder)
    nbytes = sum(
        storage.size(storage.join(folder, f)) for f in files if storage.isfile(storage.join(folder, f))
    )
    if not storage.isfile(meta_path):
        problem = (
            f"{meta_path}: missing, so {name} is not a checkpoint (an interrupted save or a "
            "damaged folder); ladle ignores it: delete it or restore its meta.json"
        )
    else:
        try:
            with storage.open(meta_path, "rb") as handle:
                info = CheckpointInfo.from_meta(json.loads(handle.read()), folder)
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
    run, names = verification_targets(path)
    checks = []
    for done, name in enumerate(names):
        if progress is not None:
            progress(name, done, len(names))
        checks.append(check_checkpoint(run, name, load=load))
    return Verification(path=storage_for(path)[1], checkpoints=checks)
