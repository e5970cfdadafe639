"""Path-level shorthands for readers that take local paths and URLs alike.

The formats, the tools and the CLI name files by path or URL; each helper here
finds the `Storage` that serves it (`locate`) and asks it one thing: what is
there, its size, its bytes, its byte ranges, or a local file with its content
(`local_copy`, for readers that need a real file, such as `torch.load`).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager

from ladle.store.fsspec_storage import FsspecStorage
from ladle.store.ranged import RangedFile
from ladle.store.storage import LocalStorage, Storage, is_url, local_path_of, storage_for

_LOCAL = LocalStorage()


def locate(path: str | os.PathLike[str]) -> tuple[Storage, str]:
    """The storage of a path or URL and the path in its spelling; a local path stays as given
    (relative stays relative, so messages name what the user typed), `file://` is removed."""
    text = os.fspath(path)
    if is_url(text):
        return storage_for(text)
    return _LOCAL, local_path_of(text)


def path_kind(path: str | os.PathLike[str]) -> str | None:
    """ "file", "dir", or None when nothing is there: one request on a store (exists + isdir take two)."""
    storage, where = locate(path)
    if isinstance(storage, FsspecStorage):
        return storage.kind(where)
    if os.path.isdir(where):
        return "dir"
    return "file" if os.path.exists(where) else None


def path_exists(path: str | os.PathLike[str]) -> bool:
    storage, where = locate(path)
    return storage.exists(where)


def path_isdir(path: str | os.PathLike[str]) -> bool:
    storage, where = locate(path)
    return storage.isdir(where)


def path_isfile(path: str | os.PathLike[str]) -> bool:
    storage, where = locate(path)
    return storage.isfile(where)


def path_size(path: str | os.PathLike[str]) -> int:
    storage, where = locate(path)
    return storage.size(where)


def path_mtime(path: str | os.PathLike[str]) -> float:
    """When the file at a path or URL was last written (0.0 when a store does not say)."""
    storage, where = locate(path)
    return storage.mtime(where)


def path_file_sizes(path: str | os.PathLike[str]) -> dict[str, int]:
    """Every file under a folder (path or URL), relative to it, with its size."""
    storage, where = locate(path)
    return storage.file_sizes(where)


def read_path(path: str | os.PathLike[str]) -> bytes:
    """The whole content of a (small) file at a path or URL."""
    storage, where = locate(path)
    return storage.read_bytes(where)


def open_ranged(path: str | os.PathLike[str]) -> RangedFile:
    """Byte ranges of the file at a local path or URL (see `RangedFile`)."""
    storage, where = locate(path)
    return storage.open_ranged(where)


def download(path: str | os.PathLike[str], *, storage: Storage | None = None) -> str:
    """Copy a file at a URL to a new temporary file and return its path; the caller deletes it.

    `storage` is the storage that serves `path` (a run's, which carries its
    `storage_options`); without it the storage is found from the path.
    """
    import tempfile

    storage, where = locate(path) if storage is None else (storage, os.fspath(path))
    fd, tmp = tempfile.mkstemp(prefix="ladle-", suffix="-" + where.rstrip("/").rsplit("/", 1)[-1])
    try:
        with os.fdopen(fd, "wb") as out, storage.open(where, "rb") as src:
            shutil.copyfileobj(src, out, 8 << 20)
    except BaseException:
        os.remove(tmp)
        raise
    return tmp


@contextmanager
def local_copy(path: str | os.PathLike[str], *, storage: Storage | None = None) -> Iterator[str]:
    """A local file with the content of `path`: the path itself when local, else a temporary
    download that is deleted on exit, also when the reader fails (for readers that need a real
    file, e.g. `torch.load`, `safe_open`). `storage` as for `download`."""
    storage, where = locate(path) if storage is None else (storage, os.fspath(path))
    local = storage.local_path(where)
    if local is not None:
        yield local
        return
    tmp = download(where, storage=storage)
    try:
        yield tmp
    finally:
        os.remove(tmp)
