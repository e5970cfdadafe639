"""Byte ranges of one file, read on demand: the reads under every tensor ladle loads.

`RangedFile` is what `Storage.open_ranged` (and `ladle.store.paths.open_ranged`) give:
locally `preadv` at given offsets, on an fsspec store ranged GETs fetched in blocks
ahead of the reader, so tensors are read without fetching whole checkpoints and the
network overlaps the averaging. Recently read headers are kept per object version, so
a second reader of the same object (the checksum of what an average reads) opens it
without a request.
"""

from __future__ import annotations

import io
import os
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from ladle.store.fsspec_storage import FsspecStorage

# Ranged reads from a store fetch at least this much ahead: few requests, and reading
# tensors in storage order still fetches each byte once.
READ_AHEAD = 16 << 20
# The first read of a file on a store fetches at least this much: a safetensors header
# (length prefix and JSON) usually fits, so opening a file costs one request.
HEAD_BYTES = 64 << 10
_MAX_IO = 1 << 30  # preadv moves at most ~2 GiB per call on Linux


class RangedFile(Protocol):
    """Byte ranges of one file, read on demand (see `open_ranged`)."""

    path: str
    size: int

    def read_into(self, view: memoryview, offset: int) -> None: ...
    def will_read(self, offset: int) -> None:
        """A hint: data from `offset` on will be read next (a store starts fetching it)."""
        ...

    def read(self, offset: int, count: int) -> bytes:
        """`count` bytes from `offset`, fewer only where the file ends."""
        ...

    def read_range(self, offset: int, count: int) -> bytes:
        """Exactly these bytes (fewer only where the file ends), one request on a store, past
        any read-ahead: for scattered small reads (the records of a zip file)."""
        ...

    def close(self) -> None: ...


class RangedIO(io.RawIOBase):
    """Bytes [start, start + length) of a `RangedFile` as a seekable, read-only file of their own
    (what `zipfile` and `torch.load` take): each read is one `read_range` (one request on a store)."""

    def __init__(self, ranged: RangedFile, start: int = 0, length: int | None = None) -> None:
        super().__init__()
        self._ranged, self._start, self._pos = ranged, start, 0
        self._length = ranged.size - start if length is None else length

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._length}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        count = max(0, min(len(view), self._length - self._pos))
        data = self._ranged.read_range(self._start + self._pos, count) if count else b""
        view[: len(data)] = data
        self._pos += len(data)
        return len(data)


class LocalRangedFile:
    """A local file read with `preadv` at given offsets (no shared file position, thread-safe)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd = os.open(path, os.O_RDONLY)
        self.size = os.fstat(self._fd).st_size

    def read_into(self, view: memoryview, offset: int) -> None:
        """Fill `view` from `offset`; EOFError when the file ends first."""
        done, total = 0, len(view)
        while done < total:
            n = os.preadv(self._fd, [view[done : min(total, done + _MAX_IO)]], offset + done)
            if n <= 0:
                raise EOFError(f"{self.path}: ends at byte {offset + done}, expected {offset + total}")
            done += n

    def will_read(self, offset: int) -> None:
        """Nothing to start: the page cache reads ahead."""

    def fileno(self) -> int:
        """The open file descriptor (to map the file)."""
        return self._fd

    def read_range(self, offset: int, count: int) -> bytes:
        return self.read(offset, count)

    def read(self, offset: int, count: int) -> bytes:
        """`count` bytes from `offset` (fewer only at the end of the file)."""
        parts, done = [], 0
        while done < count:
            chunk = os.pread(self._fd, min(count - done, _MAX_IO), offset + done)
            if not chunk:
                break
            parts.append(chunk)
            done += len(chunk)
        return b"".join(parts)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class FsspecRangedFile:
    """A file on an fsspec store read with ranged requests, in blocks of READ_AHEAD bytes.

    The first bytes (a header) are one request, kept (`read` from offset 0); scattered
    small reads (`read_range`, the records of a zip file) are one request each. Data
    reads (`read_into`, and `read` past the first bytes) go through blocks that start
    where the reader said it will read (`will_read`, e.g. after a safetensors header):
    reading in file order fetches each byte once, the next block in the background
    while the current one is used, so the network overlaps the averaging and several
    files download at once. At most the blocks of the current read and the next one
    are held.
    `fetched` counts the bytes requested from the store.
    """

    def __init__(self, storage: FsspecStorage, path: str, block: int = READ_AHEAD) -> None:
        self.path = path
        self.size, self._version = storage.stat(path)
        self.fetched = 0
        self._storage = storage
        self._block = max(1, int(block))
        self._base = 0  # where block 0 starts
        self._head = b""  # bytes [0, len(_head)), fetched by the first small read
        self._blocks: dict[int, Future[bytes]] = {}
        self._lock = threading.Lock()

    def _fetch_range(self, start: int, end: int) -> bytes:
        with self._storage.guard(self.path):
            data = bytes(self._storage.fs.cat_file(self.path, start=start, end=end))
        if len(data) != end - start:
            raise EOFError(f"{self.path}: ends at byte {start + len(data)}, expected {end}")
        self.fetched += len(data)
        return data

    def _span(self, index: int) -> tuple[int, int]:
        start = self._base + index * self._block
        return start, min(self.size, start + self._block)

    def _future(self, index: int) -> Future[bytes]:
        with self._lock:
            future = self._blocks.get(index)
            if future is None:
                future = _prefetcher().submit(self._fetch_range, *self._span(index))
                self._blocks[index] = future
            return future

    def will_read(self, offset: int) -> None:
        """Start fetching the data from `offset` on in the background (blocks start there, or
        after the bytes the first small read already fetched)."""
        with self._lock:
            offset = max(offset, len(self._head))
            if self._blocks or not 0 <= offset < self.size:
                return
            self._base = offset
        self._future(0)

    def read_into(self, view: memoryview, offset: int) -> None:
        """Fill `view` from `offset`; EOFError when the object ends first."""
        total = len(view)
        if offset < 0 or offset + total > self.size:
            raise EOFError(f"{self.path}: {self.size} bytes, a read of {offset}-{offset + total} lies beyond")
        if not total:
            return
        if offset < len(self._head):
            # The part the first read already fetched comes from it; the rest from the blocks.
            piece = self._head[offset : offset + total]
            view[: len(piece)] = piece
            if len(piece) == total:
                return
            view, offset, total = view[len(piece) :], offset + len(piece), total - len(piece)
        if offset < self._base:
            view[:] = self._fetch_range(offset, offset + total)
            return
        first = (offset - self._base) // self._block
        last = (offset + total - 1 - self._base) // self._block
        with self._lock:
            for index in [i for i in self._blocks if i < first]:
                del self._blocks[index]  # read in order: earlier blocks are not needed again
        if self._span(last + 1)[0] < self.size:
            self._future(last + 1)  # the next block, fetched while this one is used
        done = 0
        for index in range(first, last + 1):
            data = self._future(index).result()
            begin = offset + done - self._span(index)[0]
            piece = data[begin : begin + total - done]
            view[done : done + len(piece)] = piece
            done += len(piece)

    def read(self, offset: int, count: int) -> bytes:
        """`count` bytes from `offset` (fewer only at the end of the object).

        The first read from offset 0 fetches at least HEAD_BYTES and keeps them, so a
        header and its length prefix cost one request, and the blocks start after them.
        """
        count = max(0, min(count, self.size - offset))
        if not count:
            return b""
        if offset + count <= len(self._head):
            return self._head[offset : offset + count]
        if offset == 0 and not self._blocks and not self._head:
            key = (self.path, self.size, self._version)
            with _HEADS_LOCK:
                self._head = _HEADS.get(key, b"")
            if len(self._head) < count:
                self._head = self._fetch_range(0, min(self.size, max(count, HEAD_BYTES)))
                with _HEADS_LOCK:
                    _HEADS[key] = self._head
                    while len(_HEADS) > _HEADS_KEPT:
                        _HEADS.popitem(last=False)
            return self._head[:count]
        buf = bytearray(count)
        self.read_into(memoryview(buf), offset)
        return bytes(buf)

    def read_range(self, offset: int, count: int) -> bytes:
        count = max(0, min(count, self.size - offset))
        if not count:
            return b""
        if offset + count <= len(self._head):
            return self._head[offset : offset + count]
        return self._fetch_range(offset, offset + count)

    def close(self) -> None:
        with self._lock:
            blocks, self._blocks = self._blocks, {}
        for future in blocks.values():
            future.cancel()


# The first bytes of recently opened objects, by (URL, size, version): a second reader of the same
# object (the checksum of what an average reads) gets its header without a request.
_HEADS: OrderedDict[tuple[str, int, str], bytes] = OrderedDict()
_HEADS_KEPT = 64
_HEADS_LOCK = threading.Lock()

_PREFETCH: ThreadPoolExecutor | None = None
_PREFETCH_LOCK = threading.Lock()


def _prefetcher() -> ThreadPoolExecutor:
    """The shared pool that fetches blocks of files on stores (one per process)."""
    global _PREFETCH
    with _PREFETCH_LOCK:
        if _PREFETCH is None:
            _PREFETCH = ThreadPoolExecutor(max_workers=8, thread_name_prefix="ladle-fetch")
        return _PREFETCH
