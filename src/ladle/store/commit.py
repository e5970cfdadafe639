"""The local commit protocol: a `PendingCheckpoint` written into a temporary folder, then renamed.

Files are written into `<run>/.tmp-<name>-<random>/`; `commit()` hashes and fsyncs
them, writes `meta.json` last, renames the folder into place and fsyncs the run
directory (see docs/architecture.md). Object stores, which cannot rename, use
`ladle.store.object_commit` instead; `Run.begin` picks one.
"""

from __future__ import annotations

import os
import secrets
import tempfile
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from ladle.errors import ConfigError, RunError
from ladle.store.checkpoint import CheckpointInfo, FileRecord, new_record
from ladle.store.checksums import HASH_CHUNK, file_checksums
from ladle.store.failures import writing
from ladle.store.layout import META_NAME, TMP_PREFIX
from ladle.store.storage import LocalStorage

if TYPE_CHECKING:
    from ladle.store.run import Run


class PendingCheckpoint:
    """A checkpoint being written; nothing is visible until `commit()` succeeds."""

    def __init__(self, run: Run, name: str) -> None:
        self.run = run
        self.name = name
        storage = run.storage
        self.tmp_path = storage.join(run.path, f"{TMP_PREFIX}{name}-{secrets.token_hex(4)}")
        with writing(run.path, self.tmp_path):
            storage.makedirs(self.tmp_path)
        self._local = isinstance(storage, LocalStorage)
        self._pending: dict[str, int] = {}  # file name -> size, written but not yet committed
        self._written: dict[str, FileRecord] = {}  # written, fsynced and hashed elsewhere (other ranks)
        self._done = False

    def write(self, filename: str, writer: Callable[[str], None]) -> None:
        """Have `writer(path)` write one file; its fsync and checksum run in the background."""
        if filename == META_NAME or "/" in filename or filename.startswith("."):
            raise ConfigError(f"{filename!r} cannot be a checkpoint file name")
        storage = self.run.storage
        target = storage.join(self.tmp_path, filename)
        with writing(self.run.path, storage.join(self.run.path, self.name, filename)):
            self._write(filename, target, writer)
        # Checksums and fsyncs wait for commit(): reading back or flushing one file while
        # the next is written slows that write down more than the overlap gains.
        self._pending[filename] = storage.size(target)

    def _write(self, filename: str, target: str, writer: Callable[[str], None]) -> None:
        storage = self.run.storage
        if self._local:
            writer(target)
        else:
            # Writers such as safetensors need a real file; stage it, then upload.
            fd, staged = tempfile.mkstemp(prefix="ladle-", suffix=f"-{filename}")
            os.close(fd)
            try:
                writer(staged)
                with open(staged, "rb") as src, storage.open(target, "wb") as dst:
                    while chunk := src.read(HASH_CHUNK):
                        dst.write(chunk)
            finally:
                os.remove(staged)

    def file_path(self, filename: str) -> str:
        return self.run.storage.join(self.tmp_path, filename)

    def add_written(self, records: Mapping[str, FileRecord]) -> None:
        """Record files another process wrote into `tmp_path`, fsynced and hashed (a sharded save's ranks)."""
        self._written.update(records)

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
        """Write meta.json, rename the directory into place, fsync, update the index.

        Once the rename is done the checkpoint is committed: a failure to rewrite the
        index after it is only a warning. A pending checkpoint commits (or aborts) once.
        """
        if self._done:
            raise RunError(f"{self.run.path}: checkpoint {self.name!r} is already committed or aborted")
        storage = self.run.storage
        final_path = storage.join(self.run.path, self.name)
        try:
            # Largest first: its checksum is the long pole, the others fit beside it.
            order = sorted(self._pending, key=lambda f: -self._pending[f])
            with (
                writing(self.run.path, final_path),
                ThreadPoolExecutor(max_workers=2, thread_name_prefix="ladle-commit") as pool,
            ):
                hashed = {f: pool.submit(file_checksums, storage, self.file_path(f)) for f in order}
                synced = [pool.submit(storage.fsync_file, self.file_path(f)) for f in order]
                files = dict(self._written)
                files.update(
                    (f, FileRecord(size=self._pending[f], **hashed[f].result())) for f in self._pending
                )
                for future in synced:
                    future.result()
            info = new_record(
                self.name,
                final_path,
                files,
                seq=self.run.next_seq(),
                step=step,
                epoch=epoch,
                metrics=metrics,
                pinned=pinned,
                monitor=monitor,
                kind=kind,
                extra=extra,
            )
            meta_tmp = storage.join(self.tmp_path, META_NAME)
            with writing(self.run.path, storage.join(final_path, META_NAME)):
                with storage.open(meta_tmp, "wb") as handle:
                    handle.write(info.meta_bytes())
                storage.fsync_file(meta_tmp)
                storage.fsync_dir(self.tmp_path)
            with writing(self.run.path, final_path):
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
