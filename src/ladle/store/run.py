"""A run directory: atomic checkpoint commits, the index, scan/repair, checksums.

Commit protocol (see docs/architecture.md): files are written into
`<run>/.tmp-<name>-<random>/`, each fsynced (and hashed, overlapped with the
fsync); `meta.json` is written last as the commit marker and fsynced; the
directory is renamed into place; the run directory is fsynced; then the index
`ladle.json` is rewritten atomically. A directory without a valid `meta.json`
is not a checkpoint. The index is a cache: it is rebuilt from the `meta.json`
files whenever it is missing or disagrees with the directory listing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import secrets
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from ladle._version import __version__
from ladle.errors import (
    CheckpointNotFound,
    ConfigError,
    CorruptCheckpoint,
    NotARunDirectory,
    RunError,
    RunNotFound,
)
from ladle.metrics import Mode, is_finite_number, sort_key
from ladle.store.lock import LOCK_NAME, RunLock
from ladle.store.storage import LocalStorage, Storage, atomic_write, storage_for

log = logging.getLogger("ladle")

INDEX_NAME = "ladle.json"
META_NAME = "meta.json"
TMP_PREFIX = ".tmp-"
TRASH_PREFIX = ".trash-"
CHECKPOINT_FORMAT = "ladle-checkpoint/1"
RUN_FORMAT = "ladle-run/1"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+=-]{0,199}$")
_HASH_CHUNK = 8 << 20


def checkpoint_name(step: int) -> str:
    """The default directory name of the checkpoint saved at `step`."""
    return f"step-{step:09d}"


def validate_name(name: str) -> str:
    """A checkpoint name must be a plain directory name that cannot collide with run files."""
    if not _NAME_RE.match(name) or name in (INDEX_NAME, LOCK_NAME, META_NAME, "history.jsonl"):
        raise ConfigError(
            f"checkpoint name {name!r} is not allowed; use letters, digits and ._+=- "
            "and do not start with a dot"
        )
    return name


@dataclass(frozen=True)
class FileRecord:
    """Size and sha256 of one file of a checkpoint, as recorded at commit."""

    size: int
    sha256: str


@dataclass(frozen=True)
class CheckpointInfo:
    """What the index knows about one committed checkpoint (read without loading tensors)."""

    name: str
    path: str
    step: int
    epoch: int | None
    time: float
    metrics: dict[str, float]
    files: dict[str, FileRecord]
    pinned: bool = False
    monitor: dict[str, str] | None = None
    kind: str = "train"
    seq: int = 0
    """Commit order within the run: the newest checkpoint has the largest seq."""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def size(self) -> int:
        """Total bytes of the checkpoint's recorded files."""
        return sum(f.size for f in self.files.values())

    def file(self, filename: str) -> str:
        """Path of one file of this checkpoint."""
        return f"{self.path.rstrip('/')}/{filename}"

    def has(self, filename: str) -> bool:
        return filename in self.files

    def to_meta(self) -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT,
            "name": self.name,
            "step": self.step,
            "epoch": self.epoch,
            "time": self.time,
            "metrics": self.metrics,
            "files": {k: {"size": v.size, "sha256": v.sha256} for k, v in self.files.items()},
            "pinned": self.pinned,
            "monitor": self.monitor,
            "kind": self.kind,
            "seq": self.seq,
            "extra": self.extra,
            "ladle_version": self.extra.get("ladle_version", __version__),
        }

    def meta_bytes(self) -> bytes:
        """The exact bytes of this checkpoint's meta.json."""
        return json.dumps(self.to_meta(), indent=1).encode()

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any], path: str) -> CheckpointInfo:
        """Parse a meta.json mapping; raises KeyError/TypeError/ValueError when malformed."""
        if meta.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"unknown format {meta.get('format')!r}")
        files = {
            str(k): FileRecord(size=int(v["size"]), sha256=str(v["sha256"]))
            for k, v in dict(meta["files"]).items()
        }
        return cls(
            name=str(meta["name"]),
            path=path,
            step=int(meta["step"]),
            epoch=None if meta.get("epoch") is None else int(meta["epoch"]),
            time=float(meta["time"]),
            metrics={str(k): v for k, v in dict(meta.get("metrics") or {}).items()},
            files=files,
            pinned=bool(meta.get("pinned", False)),
            monitor=dict(meta["monitor"]) if meta.get("monitor") else None,
            kind=str(meta.get("kind", "train")),
            seq=int(meta.get("seq", 0)),
            extra=dict(meta.get("extra") or {}),
        )


def _order(info: CheckpointInfo) -> tuple[int, int, str]:
    return (info.step, info.seq, info.name)


def best_of(checkpoints: Iterable[CheckpointInfo], metric: str, mode: Mode | str) -> CheckpointInfo | None:
    """The checkpoint with the best finite value of `metric`; the earliest wins a tie."""
    scored = [c for c in checkpoints if is_finite_number(c.metrics.get(metric))]
    if not scored:
        return None
    return min(scored, key=lambda c: (sort_key(c.metrics[metric], mode), c.seq))


def sha256_file(storage: Storage, path: str) -> str:
    """Hex sha256 of a file, read in large chunks (hashlib releases the GIL)."""
    digest = hashlib.sha256()
    with storage.open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class Run:
    """A run directory; opening one needs no lock, writing needs `acquire()` first.

    `Run(path)` opens an existing run for reading; `Run(path, create=True)` also
    creates the directory. Leftover temporary directories are ignored (and removed
    by a writer); a stale or missing index is rebuilt from the meta.json files.
    """

    def __init__(self, path: str | os.PathLike[str], *, create: bool = False) -> None:
        self.storage, self.path = storage_for(path)
        if self.storage.exists(self.path) and not self.storage.isdir(self.path):
            raise NotARunDirectory(
                f"{self.path}: is a file, not a run directory; pass a directory path "
                "(ladle creates it) or the parent of your checkpoints"
            )
        if not self.storage.exists(self.path):
            if not create:
                raise RunNotFound(
                    f"{self.path}: no such run directory; check the path, or create the run "
                    "by opening a CheckpointManager on it"
                )
            self.storage.makedirs(self.path)
        self._lock: RunLock | None = None
        self._checkpoints: dict[str, CheckpointInfo] = {}
        self.refresh()

    # -- reading -----------------------------------------------------------------

    def __repr__(self) -> str:
        return f"Run({self.path!r}, checkpoints={len(self._checkpoints)})"

    def refresh(self) -> None:
        """Re-read the index, rebuilding it from meta.json files if it is stale."""
        names = self._committed_names()
        index = self._read_index()
        # The index is trusted only if it names the same checkpoints with meta.json files
        # of the same sizes; anything else (a crash, a hand edit, corruption) rebuilds it.
        if index is not None and {n: size for n, (_, size) in index.items()} == names:
            self._checkpoints = {n: info for n, (info, _) in index.items()}
            return
        if index is not None:
            log.info("%s: index is stale, rebuilding it from meta.json files", self.path)
        rebuilt: dict[str, CheckpointInfo] = {}
        for name in names:
            info = self._read_meta(name)
            if info is not None:
                rebuilt[name] = info
        self._checkpoints = rebuilt
        if self.writable:
            self._write_index()

    def _committed_names(self) -> dict[str, int]:
        """Names of directories holding a meta.json, with that file's size."""
        names = {}
        for name in self.storage.listdir(self.path):
            if name.startswith(".") or not _NAME_RE.match(name):
                continue
            try:
                names[name] = self.storage.size(self.storage.join(self.path, name, META_NAME))
            except (FileNotFoundError, NotADirectoryError):
                continue
        return names

    def _read_index(self) -> dict[str, tuple[CheckpointInfo, int]] | None:
        index_path = self.storage.join(self.path, INDEX_NAME)
        if not self.storage.exists(index_path):
            return None
        try:
            with self.storage.open(index_path, "rb") as handle:
                data = json.loads(handle.read())
            if data.get("format") != RUN_FORMAT:
                return None
            return {
                m["name"]: (
                    CheckpointInfo.from_meta(m, self.storage.join(self.path, m["name"])),
                    int(m["meta_size"]),
                )
                for m in data["checkpoints"]
            }
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("%s: unreadable index (%s), rebuilding it", index_path, exc)
            return None

    def _read_meta(self, name: str) -> CheckpointInfo | None:
        meta_path = self.storage.join(self.path, name, META_NAME)
        try:
            with self.storage.open(meta_path, "rb") as handle:
                meta = json.loads(handle.read())
            info = CheckpointInfo.from_meta(meta, self.storage.join(self.path, name))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("%s: invalid meta.json (%s); the checkpoint is not listed", meta_path, exc)
            return None
        if info.name != name:
            log.warning("%s: meta.json names %r; the checkpoint is not listed", meta_path, info.name)
            return None
        return info

    def checkpoints(self, kind: str | None = None) -> list[CheckpointInfo]:
        """Committed checkpoints (of one `kind` if given), by step, then commit order."""
        found = self._checkpoints.values()
        if kind is not None:
            found = [c for c in found if c.kind == kind]
        return sorted(found, key=_order)

    def __len__(self) -> int:
        return len(self._checkpoints)

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self.checkpoints())

    def latest(self, kind: str | None = None) -> CheckpointInfo | None:
        """The most recently committed checkpoint (of one `kind` if given), or None."""
        found = self.checkpoints(kind)
        return max(found, key=lambda c: c.seq) if found else None

    def free_name(self, base: str) -> str:
        """`base`, or `base-1`, `base-2`, ... when a checkpoint of that name exists (a resumed run)."""
        name, suffix = base, 1
        while name in self._checkpoints:
            name, suffix = f"{base}-{suffix}", suffix + 1
        return name

    def next_seq(self) -> int:
        return 1 + max((c.seq for c in self._checkpoints.values()), default=0)

    @property
    def monitor(self) -> dict[str, str] | None:
        """The monitored metric and mode recorded by the newest checkpoint that has one."""
        for info in sorted(self._checkpoints.values(), key=lambda c: -c.seq):
            if info.monitor:
                return info.monitor
        return None

    def best(self, metric: str | None = None, mode: Mode | str | None = None) -> CheckpointInfo | None:
        """The best checkpoint by `metric` (default: the run's monitored metric)."""
        if metric is None:
            monitor = self.monitor
            if monitor is None:
                return None
            metric, mode = monitor["metric"], monitor["mode"]
        if mode is None:
            raise ConfigError(f"best({metric!r}) needs mode='min' or mode='max'")
        return best_of(self._checkpoints.values(), metric, mode)

    def get(self, ref: str | int | CheckpointInfo) -> CheckpointInfo:
        """A checkpoint by name, step, "latest", "best", or a path inside this run."""
        if isinstance(ref, CheckpointInfo):
            ref = ref.name
        found: CheckpointInfo | None
        if isinstance(ref, int):
            matches = [c for c in self.checkpoints() if c.step == ref]
            found = matches[-1] if matches else None
        elif ref == "latest":
            found = self.latest()
        elif ref == "best":
            found = self.best()
        else:
            name = str(ref).rstrip("/").rsplit("/", 1)[-1]
            found = self._checkpoints.get(name)
            if found is None and name.isdigit():
                return self.get(int(name))
        if found is None:
            names = [c.name for c in self.checkpoints()]
            shown = ", ".join(names[-8:]) if names else "none"
            raise CheckpointNotFound(
                f"{self.path}: no checkpoint {ref!r}; available: {shown} "
                "(use a name, a step number, 'latest' or 'best')"
            )
        return found

    def verify(self, ref: str | int | CheckpointInfo | None = None, *, load: bool = True) -> list[str]:
        """Problems found in one checkpoint (or all), one line each; empty when all is well.

        Recomputes every file's size and sha256 against meta.json, and with
        `load=True` also parses each file (safetensors header, weights-only unpickle).
        """
        targets = [self.get(ref)] if ref is not None else self.checkpoints()
        problems: list[str] = []
        for info in targets:
            problems.extend(verify_checkpoint(self.storage, info, load=load))
        return problems

    # -- writing -----------------------------------------------------------------

    @property
    def writable(self) -> bool:
        return self._lock is not None and self._lock.held

    def acquire(self) -> Run:
        """Take the writer lock, then clean leftovers of interrupted saves and deletions."""
        if self.writable:
            return self
        self._lock = RunLock(self.storage, self.path).acquire()
        for name in self.storage.listdir(self.path):
            if name.startswith((TMP_PREFIX, TRASH_PREFIX)):
                log.info("%s: removing %s left by an interrupted save", self.path, name)
                self.storage.rmtree(self.storage.join(self.path, name))
        self.refresh()
        self._write_index()
        return self

    def release(self) -> None:
        """Give up the writer lock; idempotent."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def _require_writer(self) -> None:
        if not self.writable:
            raise RunError(f"{self.path}: the run is open read-only; call acquire() to write")

    def begin(self, name: str) -> PendingCheckpoint:
        """Start writing checkpoint `name` into a temporary directory."""
        self._require_writer()
        validate_name(name)
        if name in self._checkpoints:
            raise ConfigError(f"{self.path}: checkpoint {name!r} already exists; choose another name")
        return PendingCheckpoint(self, name)

    def adopt(
        self,
        name: str,
        *,
        step: int,
        epoch: int | None = None,
        metrics: Mapping[str, Any] | None = None,
        monitor: Mapping[str, str] | None = None,
        kind: str = "train",
        extra: Mapping[str, Any] | None = None,
    ) -> CheckpointInfo:
        """Commit a directory another program finished writing in place (a Trainer's checkpoint-N/).

        Every file is fsynced and hashed, then meta.json is written atomically, last: a
        directory the program did not finish never counts as a checkpoint. Adopting an
        already-listed name first retracts its old meta.json, so the record is replaced.
        """
        self._require_writer()
        validate_name(name)
        storage = self.storage
        path = storage.join(self.path, name)
        filenames = [
            f
            for f in storage.listdir(path)
            if f != META_NAME and not f.startswith(".") and storage.isfile(storage.join(path, f))
        ]
        with ThreadPoolExecutor(max_workers=2, thread_name_prefix="ladle-adopt") as pool:
            synced = [pool.submit(storage.fsync_file, storage.join(path, f)) for f in filenames]
            digests = {f: pool.submit(sha256_file, storage, storage.join(path, f)) for f in filenames}
            for future in synced:
                future.result()
            files = {
                f: FileRecord(storage.size(storage.join(path, f)), digests[f].result()) for f in filenames
            }
        storage.fsync_dir(path)
        previous = self._checkpoints.get(name)
        meta_path = storage.join(path, META_NAME)
        if previous is not None:
            storage.remove(meta_path)
            del self._checkpoints[name]
            self._write_index()
        info = CheckpointInfo(
            name=name,
            path=path,
            step=int(step),
            epoch=None if epoch is None else int(epoch),
            time=time.time(),
            metrics={k: _json_number(v) for k, v in (metrics or {}).items()},
            files=files,
            pinned=previous.pinned if previous is not None else False,
            monitor=dict(monitor) if monitor else None,
            kind=kind,
            seq=self.next_seq(),
            extra={"ladle_version": __version__, **dict(extra or {})},
        )
        with atomic_write(storage, meta_path) as handle:
            handle.write(info.meta_bytes())
        self._add(info)
        return info

    def _add(self, info: CheckpointInfo) -> None:
        self._checkpoints[info.name] = info
        self._write_index()

    def delete(self, names: Iterable[str]) -> None:
        """Remove checkpoints: each is renamed away first (atomic), then erased."""
        self._require_writer()
        names = [n for n in names if n in self._checkpoints]
        if not names:
            return
        for name in names:
            trash = self.storage.join(self.path, f"{TRASH_PREFIX}{name}-{secrets.token_hex(4)}")
            self.storage.rename(self.storage.join(self.path, name), trash)
            del self._checkpoints[name]
        self.storage.fsync_dir(self.path)
        self._write_index()
        for name in self.storage.listdir(self.path):
            if name.startswith(TRASH_PREFIX):
                self.storage.rmtree(self.storage.join(self.path, name))

    def set_pinned(self, name: str, pinned: bool = True) -> CheckpointInfo:
        """Pin (or unpin) a checkpoint: pinned ones are never deleted by retention."""
        self._require_writer()
        info = self.get(name)
        updated = _replace(info, pinned=pinned)
        with atomic_write(self.storage, self.storage.join(info.path, META_NAME)) as handle:
            handle.write(updated.meta_bytes())
        self._add(updated)
        return updated

    def _write_index(self) -> None:
        ordered = self.checkpoints()
        monitor = self.monitor
        best = self.best() if monitor else None
        data = {
            "format": RUN_FORMAT,
            "ladle_version": __version__,
            "latest": latest.name if (latest := self.latest()) else None,
            "best": best.name if best else None,
            "monitor": monitor,
            "checkpoints": [{**c.to_meta(), "meta_size": len(c.meta_bytes())} for c in ordered],
        }
        with atomic_write(self.storage, self.storage.join(self.path, INDEX_NAME)) as handle:
            handle.write(json.dumps(data, indent=1).encode())


def _replace(info: CheckpointInfo, **changes: Any) -> CheckpointInfo:
    from dataclasses import replace

    return replace(info, **changes)


class PendingCheckpoint:
    """A checkpoint being written; nothing is visible until `commit()` succeeds."""

    def __init__(self, run: Run, name: str) -> None:
        self.run = run
        self.name = name
        storage = run.storage
        self.tmp_path = storage.join(run.path, f"{TMP_PREFIX}{name}-{secrets.token_hex(4)}")
        storage.makedirs(self.tmp_path)
        self._local = isinstance(storage, LocalStorage)
        self._pending: dict[str, int] = {}  # file name -> size, written but not yet committed
        self._done = False

    def write(self, filename: str, writer: Callable[[str], None]) -> None:
        """Have `writer(path)` write one file; its fsync and checksum run in the background."""
        if filename == META_NAME or "/" in filename or filename.startswith("."):
            raise ConfigError(f"{filename!r} cannot be a checkpoint file name")
        storage = self.run.storage
        target = storage.join(self.tmp_path, filename)
        if self._local:
            writer(target)
        else:
            # Writers such as safetensors need a real file; stage it, then upload.
            fd, staged = tempfile.mkstemp(prefix="ladle-", suffix=f"-{filename}")
            os.close(fd)
            try:
                writer(staged)
                with open(staged, "rb") as src, storage.open(target, "wb") as dst:
                    while chunk := src.read(_HASH_CHUNK):
                        dst.write(chunk)
            finally:
                os.remove(staged)
        # Checksums and fsyncs wait for commit(): reading back or flushing one file while
        # the next is written slows that write down more than the overlap gains.
        self._pending[filename] = storage.size(target)

    def file_path(self, filename: str) -> str:
        return self.run.storage.join(self.tmp_path, filename)

    def commit(
        self,
        *,
        step: int,
        epoch: int | None = None,
        metrics: Mapping[str, Any] | None = None,
        monitor: Mapping[str, str] | None = None,
        kind: str = "train",
        pinned: bool = False,
        extra: Mapping[str, Any] | None = None,
    ) -> CheckpointInfo:
        """Write meta.json, rename the directory into place, fsync, update the index."""
        storage = self.run.storage
        try:
            # Largest first: its checksum is the long pole, the others fit beside it.
            order = sorted(self._pending, key=lambda f: -self._pending[f])
            with ThreadPoolExecutor(max_workers=2, thread_name_prefix="ladle-commit") as pool:
                hashed = {f: pool.submit(sha256_file, storage, self.file_path(f)) for f in order}
                synced = [pool.submit(storage.fsync_file, self.file_path(f)) for f in order]
                files = {
                    f: FileRecord(size=self._pending[f], sha256=hashed[f].result()) for f in self._pending
                }
                for future in synced:
                    future.result()
            final_path = storage.join(self.run.path, self.name)
            info = CheckpointInfo(
                name=self.name,
                path=final_path,
                step=int(step),
                epoch=None if epoch is None else int(epoch),
                time=time.time(),
                metrics={k: _json_number(v) for k, v in (metrics or {}).items()},
                files=files,
                pinned=pinned,
                monitor=dict(monitor) if monitor else None,
                kind=kind,
                seq=self.run.next_seq(),
                extra={"ladle_version": __version__, **dict(extra or {})},
            )
            meta_tmp = storage.join(self.tmp_path, META_NAME)
            with storage.open(meta_tmp, "wb") as handle:
                handle.write(info.meta_bytes())
            storage.fsync_file(meta_tmp)
            storage.fsync_dir(self.tmp_path)
            storage.rename(self.tmp_path, final_path)
            storage.fsync_dir(self.run.path)
        except BaseException:
            self.abort()
            raise
        self._done = True
        self.run._add(info)
        return info

    def abort(self) -> None:
        """Throw the unfinished checkpoint away."""
        if self._done:
            return
        self._done = True
        self.run.storage.rmtree(self.tmp_path)


def _json_number(value: Any) -> Any:
    """Metrics as plain JSON values (tensors and numpy scalars become floats)."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, bool | int | str) or value is None:
        return value
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value)
    # JSON has no NaN/inf; keep them as strings so they are visibly non-finite.
    return number if is_finite_number(number) else str(number)


def verify_checkpoint(storage: Storage, info: CheckpointInfo, *, load: bool = True) -> list[str]:
    """Recompute sizes and checksums of one checkpoint's files (and parse them)."""
    problems = []
    for filename, record in sorted(info.files.items()):
        path = info.file(filename)
        if not storage.exists(path):
            problems.append(f"{path}: missing (meta.json lists it)")
            continue
        size = storage.size(path)
        if size != record.size:
            problems.append(f"{path}: size {size} bytes, meta.json recorded {record.size}")
            continue
        digest = sha256_file(storage, path)
        if digest != record.sha256:
            problems.append(f"{path}: sha256 {digest[:12]}… does not match meta.json")
            continue
        if load:
            error = _load_error(storage, path)
            if error:
                problems.append(f"{path}: {error}")
    return problems


def _load_error(storage: Storage, path: str) -> str | None:
    local = storage.local_path(path)
    if local is None:
        return None
    try:
        if path.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(local, framework="pt") as handle:
                for key in handle.keys():  # noqa: SIM118 - safe_open is not a dict
                    handle.get_slice(key)
        elif path.endswith(".pt"):
            import torch

            torch.load(local, map_location="cpu", weights_only=True, mmap=True)
        elif path.endswith(".json"):
            with open(local, "rb") as handle:
                json.load(handle)
    except Exception as exc:  # any parse failure is a finding, not a crash
        return f"cannot be loaded ({type(exc).__name__}: {str(exc).splitlines()[0][:160]})"
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
