"""A run directory: its committed checkpoints, the index, scan/repair, the writer's operations.

Opening a run reads every checkpoint's `meta.json` (`ladle.store.checkpoint`); the index
`ladle.json` is a summary for other tools and never overrides a marker (a damaged index
cannot make an intact checkpoint look bad, nor a fake one look good). A writer holds the
run's lock (`acquire()`), starts checkpoints with `begin()` (the commit protocol lives in
`ladle.store.commit`, or `ladle.store.object_commit` on object stores), adopts folders other
programs wrote, pins, records metrics and deletes. A directory without a valid `meta.json`
is not a checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import secrets
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ladle._version import __version__
from ladle.errors import CheckpointNotFound, ConfigError, NotARunDirectory, RunError, RunNotFound
from ladle.metrics import Mode, encode_metrics
from ladle.store.checkpoint import CheckpointInfo, FileRecord, best_of, new_record, parse_meta
from ladle.store.checks import verify_checkpoint
from ladle.store.checksums import file_checksums
from ladle.store.commit import PendingCheckpoint
from ladle.store.failures import writing
from ladle.store.layout import INDEX_NAME, META_NAME, NAME_RE, TRASH_PREFIX, is_leftover, validate_name
from ladle.store.lock import RunLock, refuse_link
from ladle.store.storage import LocalStorage, atomic_write, storage_for

log = logging.getLogger("ladle")

RUN_FORMAT = "ladle-run/1"


def _order(info: CheckpointInfo) -> tuple[int, int, str]:
    return (info.step, info.seq, info.name)


class Run:
    """A run directory; opening one needs no lock, writing needs `acquire()` first.

    `Run(path)` opens an existing run for reading; `Run(path, create=True)` also
    creates the directory. Leftover temporary directories are ignored (and removed
    by a writer); a stale or missing index is rebuilt from the meta.json files.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        create: bool = False,
        storage_options: Mapping[str, Any] | None = None,
    ) -> None:
        if not isinstance(path, str | os.PathLike) or not os.fspath(path).strip():
            raise ConfigError(f"path={path!r} is not allowed; use a run directory path (a non-empty string)")
        # storage_options: for a URL, the fsspec file system's options (endpoint, credentials, ...).
        self.storage, self.path = storage_for(path, storage_options)
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
            with writing(self.path, self.path):
                self.storage.makedirs(self.path)
        self._lock: RunLock | None = None
        self._checkpoints: dict[str, CheckpointInfo] = {}
        self.refresh()

    # -- reading -----------------------------------------------------------------

    def __repr__(self) -> str:
        return f"Run({self.path!r}, checkpoints={len(self._checkpoints)})"

    def refresh(self) -> None:
        """Re-read the checkpoints from their meta.json files (the index is never trusted)."""
        found: dict[str, CheckpointInfo] = {}
        for name, raw in self._read_markers().items():
            info = parse_meta(raw, self.storage.join(self.path, name), name)
            if info is not None:
                found[name] = info
        self._checkpoints = found

    def _read_markers(self) -> dict[str, bytes]:
        """The bytes of every `<name>/meta.json` of the run, by checkpoint name."""
        names = [n for n in self.storage.listdir(self.path) if not n.startswith(".") and NAME_RE.match(n)]
        paths = {n: self.storage.join(self.path, n, META_NAME) for n in names}
        fs = getattr(self.storage, "fs", None)
        if fs is not None and paths:
            # Object stores: one batched (concurrent) request instead of one round trip each.
            fetched = fs.cat(list(paths.values()), on_error="omit")
            by_path = {str(k).rstrip("/"): v for k, v in fetched.items()}
            out = {}
            for name, path in paths.items():
                raw = by_path.get(fs._strip_protocol(path))
                if raw is not None:
                    out[name] = raw
            return out
        markers = {}
        for name, path in paths.items():
            try:
                with open(path, "rb") as handle:
                    markers[name] = handle.read()
            except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
                continue
            except OSError as exc:
                log.warning("%s: unreadable (%s); the checkpoint is not listed", path, exc.strerror or exc)
        return markers

    def checkpoints(self, kind: str | None = None) -> list[CheckpointInfo]:
        """Committed checkpoints (of one `kind` if given), by step, then commit order."""
        # A copy taken at once (one C call): a background save may add a checkpoint meanwhile.
        found = list(self._checkpoints.values())
        if kind is not None:
            found = [c for c in found if c.kind == kind]
        return sorted(found, key=_order)

    def __len__(self) -> int:
        return len(self._checkpoints)

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self.checkpoints())

    def latest(self, kind: str | None = "train") -> CheckpointInfo | None:
        """The most recently committed training checkpoint (of `kind`; None: of any kind), or None.

        "latest" means the newest *training* checkpoint everywhere (resume, `RUN/latest`,
        the index): a soup committed into the run is not where training continues.
        """
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
        return best_of(list(self._checkpoints.values()), metric, mode)

    def get(self, ref: str | int | CheckpointInfo) -> CheckpointInfo:
        """A checkpoint by name, step, "latest", "best", or a path inside this run."""
        if isinstance(ref, CheckpointInfo):
            ref = ref.name
        from ladle.store.refs import parse_selector  # the one reference grammar (refs imports run)

        ref = parse_selector(ref)
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

        Recomputes every file's size and checksum against meta.json, and with
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
        try:
            for name in self.storage.listdir(self.path):
                if is_leftover(name):
                    log.info("%s: removing %s left by an interrupted write", self.path, name)
                    self._erase(self.storage.join(self.path, name))
            if not self.storage.atomic_rename:
                from ladle.store.object_commit import clean_leftovers

                clean_leftovers(self)
            self.refresh()
            self._update_index()
        except BaseException:
            self.release()
            raise
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
        """Start writing checkpoint `name`: into a temporary directory, or on an object store in
        place under its final prefix, committed by its marker (`ladle.store.object_commit`)."""
        self._require_writer()
        validate_name(name)
        if name in self._checkpoints:
            raise ConfigError(f"{self.path}: checkpoint {name!r} already exists; choose another name")
        if not self.storage.atomic_rename:
            from ladle.store.object_commit import ObjectPendingCheckpoint

            return ObjectPendingCheckpoint(self, name)  # type: ignore[return-value]
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
        self._refuse_link(path)
        filenames = [
            f
            for f in storage.listdir(path)
            if f != META_NAME and not f.startswith(".") and storage.isfile(storage.join(path, f))
        ]
        with ThreadPoolExecutor(max_workers=2, thread_name_prefix="ladle-adopt") as pool:
            synced = [pool.submit(storage.fsync_file, storage.join(path, f)) for f in filenames]
            digests = {f: pool.submit(file_checksums, storage, storage.join(path, f)) for f in filenames}
            for future in synced:
                future.result()
            files = {
                f: FileRecord(storage.size(storage.join(path, f)), **digests[f].result()) for f in filenames
            }
        storage.fsync_dir(path)
        previous = self._checkpoints.get(name)
        meta_path = storage.join(path, META_NAME)
        if previous is not None:
            storage.remove(meta_path)
            del self._checkpoints[name]
            self._update_index()
        info = new_record(
            name,
            path,
            files,
            seq=self.next_seq(),
            step=step,
            epoch=epoch,
            metrics=metrics,
            pinned=previous.pinned if previous is not None else False,
            monitor=monitor,
            kind=kind,
            extra=extra,
        )
        with atomic_write(storage, meta_path) as handle:
            handle.write(info.meta_bytes())
        self._add(info)
        return info

    def _add(self, info: CheckpointInfo) -> None:
        self._checkpoints[info.name] = info
        self._update_index()

    def _refuse_link(self, path: str) -> None:
        if isinstance(self.storage, LocalStorage):
            refuse_link(path, "write into")

    def _update_index(self) -> None:
        """Rewrite the index; a failure is only a warning (the meta.json files are the record).

        Called after a commit or a deletion has already happened on disk, so an
        error here (a full disk) must not make a successful save look failed; the
        next writer rewrites the index.
        """
        try:
            self._write_index()
        except OSError as exc:
            log.warning(
                "%s: could not rewrite %s (%s); the checkpoints are intact and the next writer rewrites it",
                self.path,
                INDEX_NAME,
                exc.strerror or exc,
            )

    def delete(self, names: Iterable[str]) -> None:
        """Remove checkpoints: each is renamed away first (atomic), then erased.

        A checkpoint folder that is a symbolic link loses only the link: ladle never
        deletes through a link.
        """
        self._require_writer()
        names = [n for n in names if n in self._checkpoints]
        if not names:
            return
        if not self.storage.atomic_rename:
            from ladle.store.object_commit import delete_from_store

            delete_from_store(self, names)
            return
        for name in names:
            trash = self.storage.join(self.path, f"{TRASH_PREFIX}{name}-{secrets.token_hex(4)}")
            self.storage.rename(self.storage.join(self.path, name), trash)
            del self._checkpoints[name]
        self.storage.fsync_dir(self.path)
        self._update_index()
        for name in self.storage.listdir(self.path):
            if name.startswith(TRASH_PREFIX):
                self._erase(self.storage.join(self.path, name))

    def _erase(self, path: str) -> None:
        """Remove a file, a folder, or (only) a symbolic link, never what a link points to."""
        if isinstance(self.storage, LocalStorage) and (os.path.islink(path) or os.path.isfile(path)):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            return
        self.storage.rmtree(path)

    def set_pinned(self, name: str, pinned: bool = True) -> CheckpointInfo:
        """Pin (or unpin) a checkpoint: pinned ones are never deleted by retention."""
        self._require_writer()
        info = self.get(name)
        return self._rewrite_meta(info, pinned=pinned)

    def add_metrics(self, name: str, metrics: Mapping[str, Any]) -> CheckpointInfo:
        """Record more metrics of a committed checkpoint (reported later at its step); meta.json
        is rewritten atomically, so readers see the old record or the new one."""
        self._require_writer()
        info = self.get(name)
        added = encode_metrics(metrics, where=f"{info.path}: metrics")
        return self._rewrite_meta(info, metrics={**info.metrics, **added})

    def _rewrite_meta(self, info: CheckpointInfo, **changes: Any) -> CheckpointInfo:
        self._refuse_link(info.path)
        updated = dataclasses.replace(info, **changes)
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
