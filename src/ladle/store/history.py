"""The run's metrics history: an append-only JSON-lines file beside the checkpoints.

Every metric the training loop reports is one line of `<run>/history.jsonl`, so a
save costs one fsync of the log, not a rewrite of the whole history (which would
grow with the square of the run's length). A resumed run first writes a marker
line `{"kind": "resume", "checkpoint": NAME, "keep": N}`: readers then drop
everything after the first N entries of the lineage, i.e. the metrics of the
interrupted attempt that the resumed run repeats. A torn last line (a crash
mid-append) is skipped.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from typing import Any

from ladle.store.run import Run
from ladle.store.storage import LocalStorage, atomic_write

log = logging.getLogger("ladle")

HISTORY_LOG = "history.jsonl"


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
    path = run.storage.join(run.path, HISTORY_LOG)
    if not run.storage.exists(path):
        return []
    with run.storage.open(path, "rb") as handle:
        return parse_history(handle.read().splitlines(), path)


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

    def _file(self) -> Any:
        if self._handle is None:
            self._handle = open(self.path, "ab")  # noqa: SIM115 - closed in close()
        return self._handle

    def close(self) -> None:
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
        if not self.write or not self._local:
            return  # object stores cannot append: the whole log is written at sync()
        lines = []
        if self._marker is not None:
            lines.append(self._marker)
            self._marker = None
        lines.append(entry)
        handle = self._file()
        handle.write(b"".join(json.dumps(x).encode() + b"\n" for x in lines))
        handle.flush()

    def sync(self) -> None:
        """Make every entry so far durable (called before a checkpoint that counts them commits)."""
        if not self.write:
            return
        if not self._local:
            with atomic_write(self.run.storage, self.path) as handle:
                handle.write(b"".join(json.dumps(x).encode() + b"\n" for x in self.entries))
            return
        if self._marker is not None and os.path.exists(self.path):
            self._file().write(json.dumps(self._marker).encode() + b"\n")
            self._marker = None
        if self._handle is not None:
            self._handle.flush()
            os.fsync(self._handle.fileno())

    def __len__(self) -> int:
        return len(self.entries)
