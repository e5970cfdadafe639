"""Checks of a committed checkpoint's files against its marker: sizes, checksums, parses.

`verify_checkpoint` is what `Run.verify()` and `ladle verify` recompute for each
file; `check_readable` is the cheap check a reader makes before it loads a file.
`ladle.store.verification` builds the whole run's report on top of these.
"""

from __future__ import annotations

import json
import os

from ladle.errors import CorruptCheckpoint, StorageError, first_line
from ladle.store.checkpoint import CheckpointInfo, FileRecord, parse_meta
from ladle.store.checksums import checksum_file
from ladle.store.layout import META_NAME
from ladle.store.storage import Storage


def verify_checkpoint(storage: Storage, info: CheckpointInfo, *, load: bool = True) -> list[str]:
    """Recompute sizes and checksums of one checkpoint's files (and parse them).

    A checkpoint that disappears while it is checked (a writer's retention deleted
    it) is not corrupt: its findings are dropped; see `vanished()`.
    """
    problems = []
    for filename, record in sorted(info.files.items()):
        path = info.file(filename)
        try:
            problem = _check_file(storage, path, record, load)
        except FileNotFoundError:
            problem = f"{path}: missing (meta.json lists it)"
        if problem is not None:
            if vanished(storage, info):
                return []
            problems.append(problem)
    return problems


def vanished(storage: Storage, info: CheckpointInfo) -> bool:
    """True when the checkpoint's meta.json is gone or no longer describes it (deleted meanwhile)."""
    try:
        with storage.open(storage.join(info.path, META_NAME), "rb") as handle:
            current = parse_meta(handle.read(), info.path)
    except (FileNotFoundError, NotADirectoryError):
        return True
    # An unreadable marker is a finding of its own, not a deletion.
    return current is not None and (current.seq != info.seq or current.files != info.files)


def _check_file(storage: Storage, path: str, record: FileRecord, load: bool) -> str | None:
    if not storage.exists(path):
        return f"{path}: missing (meta.json lists it)"
    size = storage.size(path)
    if size != record.size:
        return f"{path}: size {size} bytes, meta.json recorded {record.size}"
    checksum = record.checksum()
    if checksum is not None:
        digest = checksum_file(storage, path, checksum.algorithm)
        if digest != checksum.hex:
            recorded = checksum.hex[:12]
            return f"{path}: {checksum.algorithm} {digest[:12]}… does not match meta.json ({recorded}…)"
    if load:
        error = _load_error(storage, path)
        if error:
            return f"{path}: {error}"
    return None


def _load_error(storage: Storage, path: str) -> str | None:
    local = storage.local_path(path)
    if local is None:
        return _store_load_error(path)
    try:
        if path.endswith(".safetensors"):
            # The header validated as the format specifies (what safetensors checks too),
            # without importing torch as `safe_open(framework="pt")` does.
            from ladle.formats.safetensors_header import read_header

            read_header(local)
        elif path.endswith(".pt"):
            # The checksum proved the bytes; the structure is checked without torch (1-2 s to
            # import), unless the pickle names classes only torch's weights-only loader can judge.
            from ladle.state.pickle_scan import check_torch_archive

            if check_torch_archive(local) != []:
                import torch

                torch.load(local, map_location="cpu", weights_only=True, mmap=True)
        elif path.endswith(".json"):
            with open(local, "rb") as handle:
                json.load(handle)
        elif os.path.basename(local) == ".metadata":
            # A sharded checkpoint: DCP's metadata, and every tensor read back through it.
            from ladle.formats.dcp import dcp_problems

            if found := dcp_problems(os.path.dirname(local)):
                return f"DCP check failed: {found[0]}"
    except Exception as exc:  # any parse failure is a finding, not a crash
        return f"cannot be loaded ({type(exc).__name__}: {first_line(exc, 160)})"
    return None


def _store_load_error(path: str) -> str | None:
    """The parse check of a file on a store: a safetensors header by ranged reads (validated
    as locally, nothing downloaded); state.pt and JSON from a temporary copy."""
    from ladle.store.paths import local_copy

    try:
        if path.endswith(".safetensors"):
            from ladle.formats.safetensors_header import read_header

            read_header(path)
        elif path.endswith(".pt"):
            from ladle.state.pickle_scan import check_torch_archive

            with local_copy(path) as copy:
                if check_torch_archive(copy) != []:
                    import torch

                    torch.load(copy, map_location="cpu", weights_only=True)
        elif path.endswith(".json"):
            with local_copy(path) as copy, open(copy, "rb") as handle:
                json.load(handle)
    except StorageError:
        raise
    except Exception as exc:  # any parse failure is a finding, not a crash
        return f"cannot be loaded ({type(exc).__name__}: {first_line(exc, 160)})"
    return None


def check_readable(storage: Storage, info: CheckpointInfo, filename: str) -> None:
    """Raise CorruptCheckpoint if one file's size or checksum disagrees with meta.json."""
    record = info.files.get(filename)
    path = info.file(filename)
    if record is None:
        raise CorruptCheckpoint(f"{path}: not listed in meta.json; the checkpoint is incomplete")
    if not storage.exists(path):
        raise CorruptCheckpoint(f"{path}: missing; resume(fallback=True) uses the previous checkpoint")
    size = storage.size(path)
    if size != record.size:
        raise CorruptCheckpoint(
            f"{path}: truncated or changed ({size} bytes, expected {record.size}); "
            "resume(fallback=True) uses the previous good checkpoint"
        )
