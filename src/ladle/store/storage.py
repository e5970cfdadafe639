"""The narrow file-access seam under the run store: local disks and fsspec URLs.

Everything ladle does to files goes through a `Storage`, so a run (and any file
a command reads) can live on an object store as well as on a local disk:
`storage_for(path)` picks the storage for a path or URL (`s3://`, `gs://`,
`memory://`, `file://`, ...). Local storage gives the full durability protocol
(fsync of files and directories, atomic rename). fsspec storage gives what the
backend offers; object stores publish an object atomically on its single PUT
and have no rename, so the run store commits there with a marker written last
instead of a rename (`atomic_rename` says which protocol applies; see
`ladle.store.object_commit`).

Credentials and endpoints come from fsspec's usual configuration: the
`storage_options` passed here, fsspec's config files and `FSSPEC_<PROTOCOL>_<KEY>`
variables, and each backend's own environment (`AWS_*` for S3). Nothing here
logs them. A store that cannot be reached, a missing bucket or a refused
request becomes a one-line `StorageError` naming the URL and what to do.

fsspec file systems are served by `ladle.store.fsspec_storage.FsspecStorage`; ranged
reads of one file live in `ladle.store.ranged`; path-level shorthands that
take a path or URL (`path_exists`, `read_path`, `open_ranged`, `local_copy`, ...) in
`ladle.store.paths`.
"""

from __future__ import annotations

import io
import os
import shutil
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import IO, Any, Protocol

from ladle.errors import StorageError
from ladle.store.fsspec_storage import FsspecStorage
from ladle.store.ranged import LocalRangedFile, RangedFile


def is_url(path: str | os.PathLike[str]) -> bool:
    """True for a URL served by fsspec (`s3://...`, `memory://...`); `file://` is a local path."""
    text = os.fspath(path)
    return "://" in text and not text.startswith("file://")


def local_path_of(path: str | os.PathLike[str]) -> str:
    """A local path as given, with a `file://` scheme removed."""
    text = os.fspath(path)
    return text[len("file://") :] if text.startswith("file://") else text


class Storage(Protocol):
    """What the run store needs from a file system; paths are plain strings."""

    atomic_rename: bool
    """True when `rename` is atomic (a local disk); False on object stores."""

    def join(self, *parts: str) -> str: ...
    def exists(self, path: str) -> bool: ...
    def isdir(self, path: str) -> bool: ...
    def isfile(self, path: str) -> bool: ...
    def listdir(self, path: str) -> list[str]: ...
    def makedirs(self, path: str) -> None: ...
    def open(self, path: str, mode: str) -> IO[bytes]: ...
    def size(self, path: str) -> int: ...
    def mtime(self, path: str) -> float: ...
    def read_bytes(self, path: str) -> bytes: ...
    def write_bytes(self, path: str, data: bytes) -> None: ...
    def rename(self, src: str, dst: str) -> None: ...
    def replace(self, src: str, dst: str) -> None: ...
    def remove(self, path: str) -> None: ...
    def rmtree(self, path: str) -> None: ...
    def fsync_file(self, path: str) -> None: ...
    def fsync_dir(self, path: str) -> None: ...
    def local_path(self, path: str) -> str | None: ...
    def open_ranged(self, path: str) -> RangedFile: ...
    def file_sizes(self, path: str) -> dict[str, int]: ...


class LocalStorage:
    """POSIX files with fsync and atomic rename."""

    atomic_rename = True

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

    def mtime(self, path: str) -> float:
        return os.path.getmtime(path)

    def read_bytes(self, path: str) -> bytes:
        with open(path, "rb") as handle:
            return handle.read()

    def write_bytes(self, path: str, data: bytes) -> None:
        """Write a small file atomically (temporary file, fsync, rename)."""
        with atomic_write(self, path) as handle:
            handle.write(data)

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

    def open_ranged(self, path: str) -> RangedFile:
        return LocalRangedFile(path)

    def file_sizes(self, path: str) -> dict[str, int]:
        """Every file under `path` (recursively), by path relative to it, with its size."""
        out = {}
        for root, _dirs, files in os.walk(path):
            for name in files:
                full = os.path.join(root, name)
                out[os.path.relpath(full, path)] = os.path.getsize(full)
        return dict(sorted(out.items()))


def storage_for(
    path: str | os.PathLike[str], storage_options: Mapping[str, Any] | None = None
) -> tuple[Storage, str]:
    """The storage that serves `path` and the path in that storage's spelling.

    `storage_options` go to the fsspec file system of a URL (endpoint, credentials,
    ...); fsspec's own configuration and the backend's environment apply as well.
    """
    text = os.fspath(path)
    if is_url(text):
        import fsspec

        protocol = text.split("://", 1)[0]
        try:
            fs, stripped = fsspec.core.url_to_fs(text, **dict(storage_options or {}))
        except ImportError as exc:
            from ladle.errors import MissingDependency

            raise MissingDependency(
                f"{text}: the {protocol}:// file system needs a package that is not installed "
                f"({exc}); for S3 run: pip install 'ladle[s3]'"
            ) from None
        except ValueError as exc:
            raise StorageError(f"{text}: {exc}; check the URL's protocol") from None
        return FsspecStorage(fs, protocol), f"{protocol}://{stripped}"
    return LocalStorage(), os.path.abspath(local_path_of(text))


@contextmanager
def atomic_write(storage: Storage, path: str) -> Iterator[IO[bytes]]:
    """Write `path` so readers see the old file or the whole new one, never a part.

    Locally: a temporary file, fsync, rename. On a store an object is published
    whole when its upload completes (and not at all when it fails), so it is written
    directly: an object store's "rename" would be a copy, not atomic.
    """
    if not storage.atomic_rename:
        # Buffered here, not in an open upload: closing an upload after an error would
        # publish the part written so far.
        buffer = io.BytesIO()
        yield buffer
        storage.write_bytes(path, buffer.getvalue())
        return
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with storage.open(tmp, "wb") as handle:
            yield handle
            handle.flush()
            fileno = getattr(handle, "fileno", None)
            if fileno is not None:
                os.fsync(fileno())
        storage.replace(tmp, path)
    except BaseException:
        if storage.exists(tmp):
            storage.remove(tmp)
        raise
    parent = path.rsplit("/", 1)[0] if "/" in path else "."
    storage.fsync_dir(parent)
