"""The run's metrics history: an append-only JSON-lines file beside the checkpoints.

Every metric the training loop reports is one line of `<run>/history.jsonl`, so a
save costs one fsync of the log, not a rewrite of the whole history (which would
grow with the square of the run's length). A resumed run first writes a marker
line `{"kind": "resume", "checkpoint": NAME, "keep": N}`: readers then drop
everything after the first N entries of the lineage, i.e. the metrics of the
interrupted attempt that the resumed run repeats. A torn last line (a crash
mid-append) is skipped, and the next writer starts on a fresh line so the torn
bytes never swallow its first entry. The log is opened with `O_NOFOLLOW`: a
`history.jsonl` that is a symbolic link is refused, never appended through.
On an object store, which cannot append, each sync writes the lines since the
last one as a numbered part (`history.parts/000000001.jsonl`, ...), read in
order as one log: nothing is rewritten.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from typing import Any

from ladle.store.failures import writing
from ladle.store.lock import refuse_link
from ladle.store.run import Run
from ladle.store.storage import LocalStorage

log = logging.getLogger("ladle")

HISTORY_LOG = "history.jsonl"
# On object stores, which cannot append, each sync writes the new lines as one numbered
# part: `history.parts/000000001.jsonl`, ... (read in order, as if one log).
HISTORY_PARTS = "history.parts"


def parse_history(lines: list[bytes], where: str = "history.jsonl") -> list[dict[str, Any]]:
    """The current lineage's entries from the log's lines (markers applied)."""
    entries: list[dict[str, Any]] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except ValueError:
            log.info("%s: skipping unreadable line %d (an interrupted write)", where, number)
            continue
        if not isinstance(entry, dict):
            continue
        if entry.get("kind") == "resume":
            del entries[int(entry.get("keep", 0)) :]
        else:
            entries.append(entry)
    return entries


def read_history(run: Run) -> list[dict[str, Any]]:
    """The run's metrics history, oldest first; empty when the run has no log."""
    storage = run.storage
    path = storage.join(run.path, HISTORY_LOG)
    lines: list[bytes] = []
    if storage.exists(path):
        lines += storage.read_bytes(path).splitlines()
    for part in _parts(run).values():
        lines += storage.read_bytes(part).splitlines()
    return parse_history(lines, path)


def _parts(run: Run) -> dict[int, str]:
    """The history parts written on an object store, by number."""
    storage = run.storage
    if storage.atomic_rename:
        return {}
    folder = storage.join(run.path, HISTORY_PARTS)
    if not storage.exists(folder):
        return {}
    found = {}
    for name in storage.listdir(folder):
        stem = name.removesuffix(".jsonl")
        if name.endswith(".jsonl") and stem.isdigit():
            found[int(stem)] = storage.join(folder, name)
    return dict(sorted(found.items()))


class HistoryLog:
    """The writer's side: appends entries, syncs before each checkpoint commit."""

    def __init__(self, run: Run, *, write: bool = True) -> None:
        self.run = run
        self.write = write
        self.path = run.storage.join(run.path, HISTORY_LOG)
        self.entries: list[dict[str, Any]] = []
        self._local = isinstance(run.storage, LocalStorage)
        self._marker: dict[str, Any] | None = {"kind": "resume", "checkpoint": None, "keep": 0}
        self._handle: Any = None  # kept open: append() runs on the training step
        self._unsynced: list[dict[str, Any]] = []  # on a store: lines of the next part
        self._next_part: int | None = None

    def _file(self) -> Any:
        if self._handle is None:
            try:
                flags = os.O_RDWR | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
                fd = os.open(self.path, flags, 0o644)
            except OSError:
                refuse_link(self.path, "append")
                raise
            handle = os.fdopen(fd, "ab")
            # A crash mid-append leaves a torn last line: start on a fresh one.
            end = os.lseek(fd, 0, os.SEEK_END)
            if end and os.pread(fd, 1, end - 1) != b"\n":
                handle.write(b"\n")
            self._handle = handle
        return self._handle

    def close(self) -> None:
        if not self._local and self._unsynced:
            self.sync()
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def restart_from(self, checkpoint: str | None, keep: int | None) -> None:
        """Continue the lineage saved by `checkpoint` (its first `keep` entries), or start afresh."""
        if checkpoint is None:
            self.entries = []
        else:
            self.entries = read_history(self.run)
            if keep is not None:
                del self.entries[keep:]
        self._marker = {"kind": "resume", "checkpoint": checkpoint, "keep": len(self.entries)}

    def append(self, entry: Mapping[str, Any]) -> None:
        self.entries.append(dict(entry))
        if not self.write:
            return
        if not self._local:
            # Object stores cannot append: the new lines become one part at sync().
            if self._marker is not None:
                self._unsynced.append(self._marker)
                self._marker = None
            self._unsynced.append(dict(entry))
            return
        lines = []
        if self._marker is not None:
            lines.append(self._marker)
            self._marker = None
        lines.append(entry)
        with writing(self.run.path, self.path):
            handle = self._file()
            handle.write(b"".join(json.dumps(x).encode() + b"\n" for x in lines))
            handle.flush()

    def sync(self) -> None:
        """Make every entry so far durable (called before a checkpoint that counts them commits)."""
        if not self.write:
            return
        with writing(self.run.path, self.path):
            if not self._local:
                self._write_part()
                return
            if self._marker is not None and os.path.exists(self.path):
                self._file().write(json.dumps(self._marker).encode() + b"\n")
                self._marker = None
            if self._handle is not None:
                self._handle.flush()
                os.fsync(self._handle.fileno())

    def _write_part(self) -> None:
        """Write the lines since the last sync as the next numbered part (one PUT; no rewrite)."""
        storage = self.run.storage
        if self._next_part is None:
            self._next_part = 1 + max(_parts(self.run), default=0)
        if self._marker is not None and self._next_part > 1:
            # A resumed run truncates the lineage of the parts before it.
            self._unsynced.insert(0, self._marker)
            self._marker = None
        if not self._unsynced:
            return
        part = storage.join(self.run.path, HISTORY_PARTS, f"{self._next_part:09d}.jsonl")
        storage.write_bytes(part, b"".join(json.dumps(x).encode() + b"\n" for x in self._unsynced))
        self._next_part += 1
        self._unsynced = []

    def __len__(self) -> int:
        return len(self.entries)
