"""One writer per run: an advisory lock file that names its holder.

On a local disk the lock is an `flock` on `<run>/.lock`; the kernel drops it when
the holder dies, so a lock left by a killed process is taken over without any
guessing. The file's content (pid, host, time) is only there to name the holder
in the error a second writer gets. On object stores, where no such lock exists,
the lock file is written and checked on a best-effort basis.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time

from ladle.errors import RunLocked
from ladle.store.storage import LocalStorage, Storage

log = logging.getLogger("ladle")

LOCK_NAME = ".lock"


def _holder() -> dict[str, object]:
    return {"pid": os.getpid(), "host": socket.gethostname(), "time": time.time()}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """Exclusive writer lock on a run directory; release() is idempotent."""

    def __init__(self, storage: Storage, run_path: str) -> None:
        self.storage = storage
        self.path = storage.join(run_path, LOCK_NAME)
        self._fd: int | None = None
        self._held = False

    def acquire(self) -> RunLock:
        if isinstance(self.storage, LocalStorage):
            self._acquire_flock()
        else:
            self._acquire_file()
        self._held = True
        return self

    def _acquire_flock(self) -> None:
        import fcntl

        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise RunLocked(_locked_message(self.path, holder)) from None
        previous = _read_holder(fd)
        if previous.get("pid") and previous.get("pid") != os.getpid():
            log.info(
                "took over the stale lock %s left by pid %s on %s (no longer running)",
                self.path,
                previous.get("pid"),
                previous.get("host"),
            )
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(_holder()).encode(), 0)
        self._fd = fd

    def _acquire_file(self) -> None:
        if self.storage.exists(self.path):
            with self.storage.open(self.path, "rb") as handle:
                try:
                    holder = json.loads(handle.read() or b"{}")
                except ValueError:
                    holder = {}
            same_host = holder.get("host") == socket.gethostname()
            if not (same_host and not _pid_alive(int(holder.get("pid", 0)))):
                raise RunLocked(_locked_message(self.path, holder))
            log.info("took over the stale lock %s left by pid %s", self.path, holder.get("pid"))
        with self.storage.open(self.path, "wb") as handle:
            handle.write(json.dumps(_holder()).encode())

    def release(self) -> None:
        if not self._held:
            return
        self._held = False
        if self._fd is not None:
            import fcntl

            # Empty the file before unlocking so the next holder sees no stale name.
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
        elif self.storage.exists(self.path):
            self.storage.remove(self.path)

    @property
    def held(self) -> bool:
        return self._held


def _read_holder(fd: int) -> dict[str, object]:
    try:
        raw = os.pread(fd, 4096, 0)
        return json.loads(raw) if raw else {}
    except (OSError, ValueError):
        return {}


def _locked_message(path: str, holder: dict[str, object]) -> str:
    who = f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}"
    return (
        f"{path}: the run is open for writing by {who}; close that manager (or wait for it "
        "to exit) before writing, or open the run read-only with ladle.Run(path)"
    )
