"""The commit protocol of a run on an object store (no rename, one atomic PUT per object).

Object stores (S3, GCS, Azure, and fsspec's `memory://`) cannot rename a prefix,
but publish each object whole when its single upload completes. So a checkpoint
is written in place and committed by its marker:

1. `begin`: an intent object `<run>/.saving-<name>` is written first (it names the
   writer), so the data objects of an unfinished save can be told apart from a
   user's files.
2. `write`: each file is staged locally (writers such as safetensors need a real
   file), hashed while it is uploaded to `<run>/<name>/<file>`, and deleted.
3. `commit`: the writer confirms it still holds the run's lease, then writes
   `<run>/<name>/meta.json` in one PUT: from that moment the checkpoint exists.
   The intent is removed and the index (a cache) rewritten.

A prefix without a valid `meta.json` is not a checkpoint: readers never list it.
The next writer removes the data of every `.saving-<name>` intent whose
`meta.json` is missing (and nothing else: a prefix that no intent names is left
alone). Deleting (retention) writes `.deleting-<name>`, removes `meta.json`
first (the checkpoint is gone for every reader at once), then the data, then
the intent; an interrupted deletion is finished by the next writer.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from ladle.errors import ConfigError, RunError
from ladle.store.checkpoint import CheckpointInfo, FileRecord, new_record
from ladle.store.checksums import FileChecksums
from ladle.store.failures import writing
from ladle.store.layout import META_NAME
from ladle.store.lock import _holder

if TYPE_CHECKING:
    from ladle.store.run import Run

log = logging.getLogger("ladle")

SAVING_PREFIX = ".saving-"
DELETING_PREFIX = ".deleting-"
_CHUNK = 8 << 20


class ObjectPendingCheckpoint:
    """A checkpoint being written to a store; nothing is listed until `commit()` writes its marker."""

    def __init__(self, run: Run, name: str) -> None:
        self.run = run
        self.name = name
        storage = run.storage
        self.path = storage.join(run.path, name)
        self.intent = storage.join(run.path, f"{SAVING_PREFIX}{name}")
        if storage.exists(self.path):
            # Leftovers of ladle's own saves were removed when the lock was taken; these are not ladle's.
            raise ConfigError(
                f"{self.path}: exists and is not a ladle checkpoint; choose another name "
                "or move those objects away"
            )
        with writing(run.path, self.intent):
            storage.write_bytes(self.intent, json.dumps(_holder()).encode())
        self.files: dict[str, Any] = {}
        self._done = False

    def file_path(self, filename: str) -> str:
        return self.run.storage.join(self.path, filename)

    def write(self, filename: str, writer: Callable[[str], None]) -> None:
        """Have `writer(path)` write one file locally; it is hashed while uploaded, then deleted."""
        if self._done:
            raise RunError(f"{self.run.path}: checkpoint {self.name!r} is already committed or aborted")
        if filename == META_NAME or "/" in filename or filename.startswith("."):
            raise ConfigError(f"{filename!r} cannot be a checkpoint file name")
        target = self.file_path(filename)
        fd, staged = tempfile.mkstemp(prefix="ladle-", suffix=f"-{filename}")
        os.close(fd)
        try:
            with writing(self.run.path, target):
                writer(staged)
                checksums = FileChecksums()
                size = 0
                with open(staged, "rb") as src, self.run.storage.open(target, "wb") as dst:
                    while chunk := src.read(_CHUNK):
                        checksums.update(chunk)
                        dst.write(chunk)
                        size += len(chunk)
        finally:
            os.remove(staged)
        self.files[filename] = FileRecord(size=size, **checksums.result())

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
        """Confirm the lease, write meta.json (the commit marker) in one PUT, drop the intent."""
        if self._done:
            raise RunError(f"{self.run.path}: checkpoint {self.name!r} is already committed or aborted")
        storage = self.run.storage
        try:
            info = new_record(
                self.name,
                self.path,
                dict(self.files),
                seq=self.run.next_seq(),
                step=step,
                epoch=epoch,
                metrics=metrics,
                pinned=pinned,
                monitor=monitor,
                kind=kind,
                extra=extra,
            )
            if self.run._lock is not None:
                self.run._lock.confirm()
            meta = storage.join(self.path, META_NAME)
            with writing(self.run.path, meta):
                storage.write_bytes(meta, info.meta_bytes())
        except BaseException:
            self.abort()
            raise
        self._done = True
        _remove_quietly(self.run, self.intent)
        self.run._add(info)
        return info

    def abort(self) -> None:
        """Throw the unfinished checkpoint away (its marker first, should a failed PUT have landed)."""
        if self._done:
            return
        self._done = True
        try:
            _erase(self.run, self.name)
            _remove_quietly(self.run, self.intent)
        except OSError as exc:
            log.warning(
                "%s: could not remove the unfinished checkpoint %s (%s); the next writer removes it",
                self.run.path,
                self.name,
                exc,
            )


def delete_from_store(run: Run, names: Iterable[str]) -> None:
    """Delete checkpoints: intent, then the marker (gone for every reader), then data, then intent."""
    storage = run.storage
    for name in names:
        intent = storage.join(run.path, f"{DELETING_PREFIX}{name}")
        storage.write_bytes(intent, json.dumps(_holder()).encode())
        _erase(run, name)
        run._checkpoints.pop(name, None)
        _remove_quietly(run, intent)
    run._update_index()


def clean_leftovers(run: Run) -> None:
    """Finish what interrupted writers left: unfinished saves removed, interrupted deletions done.

    Only prefixes named by ladle's intent objects are touched.
    """
    storage = run.storage
    for entry in storage.listdir(run.path):
        if entry.startswith(SAVING_PREFIX):
            name, deleting = entry[len(SAVING_PREFIX) :], False
        elif entry.startswith(DELETING_PREFIX):
            name, deleting = entry[len(DELETING_PREFIX) :], True
        else:
            continue
        committed = storage.exists(storage.join(run.path, name, META_NAME))
        if deleting or not committed:
            what = "deletion" if deleting else "save"
            log.info("%s: finishing the interrupted %s of %s", run.path, what, name)
            _erase(run, name)
        _remove_quietly(run, storage.join(run.path, entry))


def _erase(run: Run, name: str) -> None:
    storage = run.storage
    path = storage.join(run.path, name)
    _remove_quietly(run, storage.join(path, META_NAME))
    storage.rmtree(path)


def _remove_quietly(run: Run, path: str) -> None:
    try:
        run.storage.remove(path)
    except FileNotFoundError:
        pass
