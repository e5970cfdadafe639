"""The narrow file-access seam under the run store: local disks and fsspec URLs.

Everything the store does to files goes through a `Storage`, so a run can live on
an object store as well as on a local disk. Local storage gives the full
durability protocol (fsync of files and directories, atomic rename); fsspec
storage gives what the backend offers (object stores publish a file atomically on
close, and "rename" of a directory is a copy).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO, Protocol


class Storage(Protocol):
    """What the run store needs from a file system; paths are plain strings."""

    def join(self, *parts: str) -> str: ...
    def exists(self, path: str) -> bool: ...
    def isdir(self, path: str) -> bool: ...
    def isfile(self, path: str) -> bool: ...
    def listdir(self, path: str) -> list[str]: ...
    def makedirs(self, path: str) -> None: ...
    def open(self, path: str, mode: str) -> IO[bytes]: ...
    def size(self, path: str) -> int: ...
    def rename(self, src: str, dst: str) -> None: ...
    def replace(self, src: str, dst: str) -> None: ...
    def remove(self, path: str) -> None: ...
    def rmtree(self, path: str) -> None: ...
    def fsync_file(self, path: str) -> None: ...
    def fsync_dir(self, path: str) -> None: ...
    def local_path(self, path: str) -> str | None: ...


class LocalStorage:
    """POSIX files with fsync and atomic rename."""

    def join(self, *parts: str) -> str:
        return os.path.join(*parts)

    def exists(self, path: str) -> bool:
        return os.path.exists(path)

    def isdir(self, path: str) -> bool:
        return os.path.isdir(path)

    def isfile(self, path: str) -> bool:
        return os.path.isfile(path)

    def listdir(self, path: str) -> list[str]:
        return sorted(os.listdir(path))

    def makedirs(self, path: str) -> None:
        os.makedirs(path, exist_ok=True)

    def open(self, path: str, mode: str) -> IO[bytes]:
        return open(path, mode)

    def size(self, path: str) -> int:
        return os.path.getsize(path)

    def rename(self, src: str, dst: str) -> None:
        # os.rename onto an existing non-empty directory fails, which is what a
        # commit wants: a checkpoint name is never silently replaced.
        os.rename(src, dst)

    def replace(self, src: str, dst: str) -> None:
        os.replace(src, dst)

    def remove(self, path: str) -> None:
        os.remove(path)

    def rmtree(self, path: str) -> None:
        shutil.rmtree(path, ignore_errors=True)

    def fsync_file(self, path: str) -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def fsync_dir(self, path: str) -> None:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def local_path(self, path: str) -> str | None:
        return path


class FsspecStorage:
    """Any fsspec file system (s3://, gs://, memory://, ...); durability is the backend's."""

    def __init__(self, fs: object, protocol: str) -> None:
        self.fs = fs
        self.protocol = protocol

    def _strip(self, path: str) -> str:
        return self.fs._strip_protocol(path)  # type: ignore[attr-defined]

    def _url(self, path: str) -> str:
        return f"{self.protocol}://{self._strip(path)}"

    def join(self, *parts: str) -> str:
        return "/".join(p.rstrip("/") for p in parts)

    def exists(self, path: str) -> bool:
        return bool(self.fs.exists(path))  # type: ignore[attr-defined]

    def isdir(self, path: str) -> bool:
        return bool(self.fs.isdir(path))  # type: ignore[attr-defined]

    def isfile(self, path: str) -> bool:
        return bool(self.fs.isfile(path))  # type: ignore[attr-defined]

    def listdir(self, path: str) -> list[str]:
        names = self.fs.ls(path, detail=False)  # type: ignore[attr-defined]
        return sorted({n.rstrip("/").rsplit("/", 1)[-1] for n in names})

    def makedirs(self, path: str) -> None:
        self.fs.makedirs(path, exist_ok=True)  # type: ignore[attr-defined]

    def open(self, path: str, mode: str) -> IO[bytes]:
        return self.fs.open(path, mode)  # type: ignore[attr-defined,no-any-return]

    def size(self, path: str) -> int:
        return int(self.fs.size(path))  # type: ignore[attr-defined]

    def rename(self, src: str, dst: str) -> None:
        if self.exists(dst):
            raise FileExistsError(dst)
        self.fs.mv(src, dst, recursive=True)  # type: ignore[attr-defined]

    def replace(self, src: str, dst: str) -> None:
        self.fs.mv(src, dst, recursive=True)  # type: ignore[attr-defined]

    def remove(self, path: str) -> None:
        self.fs.rm(path)  # type: ignore[attr-defined]

    def rmtree(self, path: str) -> None:
        if self.exists(path):
            self.fs.rm(path, recursive=True)  # type: ignore[attr-defined]

    def fsync_file(self, path: str) -> None:
        """Object stores publish on close; nothing more to do."""

    def fsync_dir(self, path: str) -> None:
        """Object stores have no directory entries to flush."""

    def local_path(self, path: str) -> str | None:
        return None


def storage_for(path: str | os.PathLike[str]) -> tuple[Storage, str]:
    """The storage that serves `path` and the path in that storage's spelling."""
    text = os.fspath(path)
    if "://" in text and not text.startswith("file://"):
        import fsspec

        fs, stripped = fsspec.core.url_to_fs(text)
        protocol = text.split("://", 1)[0]
        return FsspecStorage(fs, protocol), f"{protocol}://{stripped}"
    if text.startswith("file://"):
        text = text[len("file://") :]
    return LocalStorage(), os.path.abspath(text)


@contextmanager
def atomic_write(storage: Storage, path: str) -> Iterator[IO[bytes]]:
    """Write `path` so readers see the old file or the whole new one, never a part."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with storage.open(tmp, "wb") as handle:
            yield handle
            handle.flush()
            fileno = getattr(handle, "fileno", None)
            if fileno is not None and isinstance(storage, LocalStorage):
                os.fsync(fileno())
        storage.replace(tmp, path)
    except BaseException:
        if storage.exists(tmp):
            storage.remove(tmp)
        raise
    parent = path.rsplit("/", 1)[0] if "/" in path else "."
    storage.fsync_dir(parent)
