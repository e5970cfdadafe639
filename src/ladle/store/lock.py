"""One writer per run: an advisory lock file that names its holder.

On a local disk the lock is an `flock` on `<run>/.lock`; the kernel drops it when
the holder dies, so a lock left by a killed process is taken over without any
guessing. The file's content (pid, host, time) is only there to name the holder
in the error a second writer gets. On object stores, where no such lock exists,
the lock is a leased object renewed by the holder (`StoreLease`, which states what
it guarantees and what it does not).

The lock file is opened with `O_NOFOLLOW`: a `.lock` that is a symbolic link is
refused, so taking the lock can never truncate a file outside the run.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import threading
import time
from typing import Any

from ladle.errors import RunError, RunLocked
from ladle.store.failures import as_write_failed
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


def refuse_link(path: str, action: str = "write") -> None:
    """Raise RunError when `path` is a symbolic link: ladle never writes or deletes through one."""
    if os.path.islink(path):
        raise RunError(
            f"{path}: is a symbolic link, and ladle does not {action} through links inside a run; "
            "replace it with a real file or folder"
        )


class RunLock:
    """Exclusive writer lock on a run directory; release() is idempotent."""

    def __init__(self, storage: Storage, run_path: str) -> None:
        self.storage = storage
        self.path = storage.join(run_path, LOCK_NAME)
        self._fd: int | None = None
        self._lease: StoreLease | None = None
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

        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
        except OSError as exc:
            if os.path.islink(self.path):
                refuse_link(self.path, "take the lock")
            raise (as_write_failed(exc, os.path.dirname(self.path), self.path) or exc) from exc
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
        self._lease = StoreLease(self.storage, self.path.rsplit("/", 1)[0]).acquire()

    def confirm(self) -> None:
        """Raise RunLocked if this writer no longer holds the run (checked before each commit).

        On a local disk the kernel's lock cannot be lost while the file is open; on a
        store the lease may have expired and been taken over while this process stalled.
        """
        if self._lease is not None:
            self._lease.confirm()

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
        elif self._lease is not None:
            self._lease.release()
            self._lease = None

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


# -- object stores -------------------------------------------------------------------

LEASE_PREFIX = ".lock-"
LEASE_SECONDS = 60.0
"""How long a store lock stays valid without renewal; the holder renews it every third of this."""


def _generation(name: str) -> int | None:
    tail = name[len(LEASE_PREFIX) :]
    return int(tail) if name.startswith(LEASE_PREFIX) and tail.isdigit() else None


class StoreLease:
    """The writer lock of a run on an object store: a leased lock object that names its holder.

    Stores have no `flock`, so the lock is an object `<run>/.lock-<generation>` holding
    `{host, pid, time, renewed, lease_s, token}`; the highest generation is the lock.
    The holder renews it from a background thread every `lease_s / 3` seconds. A
    second writer is refused, with the holder named, while the lease is live; it
    takes over when the lease has expired (or the holder was a process on this host
    that is gone) by creating the next generation with an exclusive create, so of
    several writers racing for an expired lock exactly one wins where the backend
    creates exclusively (S3 conditional writes, `memory://`). Before each commit the
    writer confirms that its generation is still the newest (`confirm()`), so a
    writer that stalled past its lease and was taken over fails instead of
    committing beside the new holder.

    Not guaranteed: clocks of the hosts must agree to well within the lease;
    backends without an exclusive create (fsspec's check-then-write fallback) leave
    a small window for two writers; a writer that stalls between `confirm()` and its
    commit marker for longer than the lease can still commit once.
    """

    def __init__(self, storage: Storage, run_path: str, lease_s: float = LEASE_SECONDS) -> None:
        self.storage = storage
        self.run_path = run_path
        self.lease_s = float(lease_s)
        self.path: str | None = None
        self._token = secrets.token_hex(8)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lost: str | None = None

    def _generations(self) -> dict[int, str]:
        found = {}
        for name in self.storage.listdir(self.run_path):
            generation = _generation(name)
            if generation is not None:
                found[generation] = self.storage.join(self.run_path, name)
        return found

    def _read(self, path: str) -> dict[str, Any] | None:
        try:
            holder = json.loads(self.storage.read_bytes(path) or b"{}")
        except FileNotFoundError:
            return None
        except ValueError:
            return {}
        return holder if isinstance(holder, dict) else {}

    def _record(self, acquired: float) -> bytes:
        now = time.time()
        return json.dumps(
            {**_holder(), "time": acquired, "renewed": now, "lease_s": self.lease_s, "token": self._token}
        ).encode()

    def acquire(self) -> StoreLease:
        generations = self._generations()
        newest = max(generations, default=0)
        if newest:
            holder = self._read(generations[newest])
            if holder is not None and _live(holder):
                raise RunLocked(_lease_message(generations[newest], holder))
            if holder is not None:
                log.info(
                    "taking over the lock %s of pid %s on %s (its lease expired or the process is gone)",
                    generations[newest],
                    holder.get("pid"),
                    holder.get("host"),
                )
        path = self.storage.join(self.run_path, f"{LEASE_PREFIX}{newest + 1:09d}")
        try:
            _create(self.storage, path, self._record(time.time()))
        except FileExistsError:
            # Another writer took the same generation first.
            holder = self._read(path) or {}
            raise RunLocked(_lease_message(path, holder)) from None
        self.path = path
        for generation, old in generations.items():
            if generation < newest + 1:
                self._remove(old)
        self._thread = threading.Thread(target=self._renew_loop, name="ladle-lease", daemon=True)
        self._thread.start()
        return self

    def _renew_loop(self) -> None:
        acquired = time.time()
        while not self._stop.wait(self.lease_s / 3):
            path = self.path
            if path is None:
                return
            try:
                self._check()
                self.storage.write_bytes(path, self._record(acquired))
            except RunLocked as exc:
                self._lost = str(exc)
                return
            except Exception as exc:  # a network hiccup: the next renewal tries again
                log.warning("%s: could not renew the lock (%s)", self.path, exc)

    def _check(self) -> None:
        if self.path is None:
            raise RunLocked(f"{self.run_path}: this writer holds no lock; acquire() it first")
        generations = self._generations()
        newest = max(generations, default=0)
        mine = self._read(self.path)
        if mine is None or mine.get("token") != self._token or generations.get(newest) != self.path:
            holder = self._read(generations[newest]) if newest else None
            raise RunLocked(
                f"{self.path}: this writer's lock was taken over"
                + (f" by pid {holder.get('pid', '?')} on host {holder.get('host', '?')}" if holder else "")
                + " after its lease expired; nothing more is committed by this writer (open the run again "
                "to continue, with one writer at a time)"
            )

    def confirm(self) -> None:
        """Raise RunLocked if another writer has taken the lock over."""
        if self._lost is not None:
            raise RunLocked(self._lost)
        self._check()

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self.path is None:
            return
        try:
            holder = self._read(self.path)
            if holder is not None and holder.get("token") == self._token:
                self._remove(self.path)
        except OSError as exc:
            log.warning("%s: could not remove the lock (%s); it expires by itself", self.path, exc)
        self.path = None

    def _remove(self, path: str) -> None:
        try:
            self.storage.remove(path)
        except FileNotFoundError:
            pass


def _create(storage: Storage, path: str, data: bytes) -> None:
    """Write a new object, failing with FileExistsError when it exists (exclusively where supported)."""
    fs = getattr(storage, "fs", None)
    if fs is None:
        with open(path, "xb") as handle:
            handle.write(data)
        return
    with storage.guard(path):  # type: ignore[attr-defined]
        fs.pipe_file(path, data, mode="create")
        fs.invalidate_cache(path)


def _live(holder: dict[str, Any]) -> bool:
    """Whether a lock record still holds: its lease runs and, on this host, its process lives."""
    try:
        renewed = float(holder.get("renewed", holder.get("time", 0)))
        lease = float(holder.get("lease_s", LEASE_SECONDS))
        pid = int(holder.get("pid", 0))
    except (TypeError, ValueError):
        return False
    if holder.get("host") == socket.gethostname() and pid and not _pid_alive(pid):
        return False
    return time.time() < renewed + lease


def _lease_message(path: str, holder: dict[str, Any]) -> str:
    try:
        left = float(holder.get("renewed", 0)) + float(holder.get("lease_s", LEASE_SECONDS)) - time.time()
    except (TypeError, ValueError):
        left = 0.0
    return f"{_locked_message(path, holder)}; its lease expires in {max(left, 0):.0f} s unless renewed"
