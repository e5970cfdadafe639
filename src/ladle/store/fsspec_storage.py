"""Storage on any fsspec file system (s3://, gs://, az://, memory://, ...): `FsspecStorage`.

Durability is the backend's. On object stores a "directory" is a key prefix, there is
no rename, and a missing bucket is named once per bucket; every backend failure becomes
a one-line `StorageError` naming the URL and what to check, never the credentials.
Local files are `ladle.store.storage.LocalStorage`; `storage_for` picks between them.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import IO, Any

from ladle.errors import StorageError
from ladle.store.ranged import FsspecRangedFile, RangedFile

# Stores without directories or rename: a "directory" is a key prefix, and making one
# must never create a bucket.
OBJECT_STORE_PROTOCOLS = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "oss", "r2"})


class FsspecStorage:
    """Any fsspec file system (s3://, gs://, memory://, ...); durability is the backend's.

    Paths are full URLs. Listings are never served from fsspec's listing cache:
    another process (a second writer, a reader) may have changed the store.
    """

    atomic_rename = False

    def __init__(self, fs: Any, protocol: str) -> None:
        self.fs = fs
        self.protocol = protocol
        self.object_store = protocol in OBJECT_STORE_PROTOCOLS
        self._buckets_seen: set[str] = set()

    def _strip(self, path: str) -> str:
        return str(self.fs._strip_protocol(path))

    @contextmanager
    def guard(self, path: str) -> Iterator[None]:
        """Turn the backend's errors for `path` into one-line ladle errors where they need one."""
        try:
            yield
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError, FileExistsError, EOFError):
            if self.object_store:
                self._check_bucket(path)
            raise
        except StorageError:
            raise
        except Exception as exc:
            raise storage_error(path, exc) from exc

    def _check_bucket(self, path: str) -> None:
        """Raise StorageError when the bucket of `path` does not exist (checked once per bucket)."""
        bucket = self._strip(path).split("/", 1)[0]
        if not bucket or bucket in self._buckets_seen:
            return
        try:
            found = bool(self.fs.exists(bucket))
        except Exception as exc:
            raise storage_error(path, exc) from exc
        if not found:
            raise StorageError(
                f"{path}: the bucket {bucket!r} does not exist (or this account cannot see it); "
                "create it first or correct the URL"
            )
        self._buckets_seen.add(bucket)

    def _fresh(self, path: str) -> None:
        self.fs.invalidate_cache(self._strip(path))

    def join(self, *parts: str) -> str:
        return "/".join(p.rstrip("/") for p in parts)

    def exists(self, path: str) -> bool:
        with self.guard(path):
            self._fresh(path)
            found = bool(self.fs.exists(path))
            if not found and self.object_store:
                self._check_bucket(path)
            return found

    def isdir(self, path: str) -> bool:
        with self.guard(path):
            self._fresh(path)
            return bool(self.fs.isdir(path))

    def kind(self, path: str) -> str | None:
        """ "file", "dir" or None, from one `info` call."""
        with self.guard(path):
            self._fresh(path)
            try:
                info = self.fs.info(path)
            except FileNotFoundError:
                if self.object_store:
                    self._check_bucket(path)
                return None
        return "dir" if info.get("type") == "directory" else "file"

    def isfile(self, path: str) -> bool:
        with self.guard(path):
            self._fresh(path)
            return bool(self.fs.isfile(path))

    def listdir(self, path: str) -> list[str]:
        """Names under `path`; an object-store prefix holding nothing lists as empty."""
        with self.guard(path):
            self._fresh(path)
            try:
                names = self.fs.ls(path, detail=False)
            except FileNotFoundError:
                if self.object_store:
                    self._check_bucket(path)
                    return []  # a prefix exists once an object is written under it
                raise
        return sorted({n.rstrip("/").rsplit("/", 1)[-1] for n in names})

    def makedirs(self, path: str) -> None:
        """Make a directory; on object stores only check that the bucket exists (never create one)."""
        if self.object_store:
            self._check_bucket(path)
            return
        with self.guard(path):
            self.fs.makedirs(path, exist_ok=True)

    def open(self, path: str, mode: str) -> IO[bytes]:
        with self.guard(path):
            return self.fs.open(path, mode)  # type: ignore[no-any-return]

    def size(self, path: str) -> int:
        with self.guard(path):
            self._fresh(path)
            return int(self.fs.size(path))

    def mtime(self, path: str) -> float:
        """When the object was last written (seconds since the epoch); 0.0 when the store does not
        say (the time only orders checkpoints that share a step)."""
        with self.guard(path):
            self._fresh(path)
            info = self.fs.info(path)
        for key in ("mtime", "LastModified", "last_modified", "updated", "created"):
            value = info.get(key)
            if isinstance(value, datetime):
                return value.timestamp()
            if isinstance(value, int | float) and not isinstance(value, bool):
                return float(value)
            if isinstance(value, str):
                try:
                    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
                except ValueError:
                    continue
        return 0.0

    def stat(self, path: str) -> tuple[int, str]:
        """Size and a version tag (ETag, or modification time) of an object, in one request."""
        with self.guard(path):
            self._fresh(path)
            info = self.fs.info(path)
        version = next(
            (str(info[k]) for k in ("ETag", "etag", "mtime", "LastModified", "created") if k in info), ""
        )
        return int(info.get("size") or 0), version

    def read_bytes(self, path: str) -> bytes:
        with self.guard(path):
            return bytes(self.fs.cat_file(path))

    def write_bytes(self, path: str, data: bytes) -> None:
        """Write one object in a single request: readers see the old one or all of the new one."""
        with self.guard(path):
            self.fs.pipe_file(path, data)
            self._fresh(path)

    def upload(self, local: str, path: str, *, exclusive: bool = False) -> None:
        """Publish a local file as one object: readers see the old object or all of the new one.

        A single PUT, or a multipart upload that becomes visible only when completed (and is
        aborted on failure): unlike writing through `open(path, "wb")`, whose close after an
        error would publish the part written so far. `exclusive`: raise FileExistsError
        instead of replacing an existing object (S3's conditional PUT; a check first on
        backends without one).
        """
        with self.guard(path):
            if exclusive:
                self.fs.put_file(local, path, mode="create")
            else:
                self.fs.put_file(local, path)
            self._fresh(path)

    def rename(self, src: str, dst: str) -> None:
        if self.exists(dst):
            raise FileExistsError(dst)
        with self.guard(src):
            self.fs.mv(src, dst, recursive=True)

    def replace(self, src: str, dst: str) -> None:
        with self.guard(src):
            self.fs.mv(src, dst, recursive=True)

    def remove(self, path: str) -> None:
        with self.guard(path):
            self.fs.rm(path)
            self._fresh(path)

    def rmtree(self, path: str) -> None:
        if self.exists(path):
            with self.guard(path):
                self.fs.rm(path, recursive=True)
                self._fresh(path)

    def fsync_file(self, path: str) -> None:
        """Object stores publish on close; nothing more to do."""

    def fsync_dir(self, path: str) -> None:
        """Object stores have no directory entries to flush."""

    def local_path(self, path: str) -> str | None:
        return None

    def open_ranged(self, path: str) -> RangedFile:
        return FsspecRangedFile(self, path)

    def file_sizes(self, path: str) -> dict[str, int]:
        """Every object under `path`, by path relative to it, with its size (one listing)."""
        with self.guard(path):
            self._fresh(path)
            found = self.fs.find(path, detail=True)
        root = self._strip(path).rstrip("/") + "/"
        sizes = {str(k)[len(root) :]: int(v.get("size") or 0) for k, v in found.items()}
        return {k: sizes[k] for k in sorted(sizes) if k and not k.startswith("/")}


def storage_error(path: str, exc: BaseException) -> StorageError:
    """A one-line StorageError for a backend failure; credentials never appear in it."""
    name = type(exc).__name__
    detail = (str(exc).strip().splitlines() or [name])[0][:160]
    if isinstance(exc, PermissionError) or "AccessDenied" in detail or "Forbidden" in detail:
        what = (
            f"access denied ({detail}); check the credentials (storage_options=, the backend's "
            "environment such as AWS_PROFILE / AWS_ACCESS_KEY_ID) and the bucket's permissions"
        )
    elif "Credentials" in name or "credentials" in detail.lower():
        what = (
            f"no usable credentials ({name}); configure them as the backend expects "
            "(storage_options=, AWS_PROFILE / AWS_ACCESS_KEY_ID for S3)"
        )
    else:
        what = (
            f"cannot reach the store ({name}: {detail}); check the network and the endpoint "
            "(storage_options={'endpoint_url': ...} or AWS_ENDPOINT_URL for S3)"
        )
    error = StorageError(f"{path}: {what}")
    if isinstance(exc, OSError) and exc.errno:
        error.errno = exc.errno
    return error
