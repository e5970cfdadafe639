"""Checksums of what an average actually read, taken in the same read.

The engine reads every byte of every member anyway; hashing them in a second
pass would read them all again. Instead each block the engine reads (a view of
the mapped file, or a ranged read into a buffer of a small ring) is handed, with
its place in the file, to the hashing threads (both checksums release the GIL), while
the engine goes on with the next block: mapped blocks in batches of a few MiB,
whose pages are dropped once hashed. A file's checksum is fed in file order: bytes the engine never
reads (headers, integer tensors a policy skips, keys left out) are read from
the file to fill the gap, and a block read again out of order is already
hashed. When every key is done, the rest of each file is hashed and each
checksum is compared with the one its run recorded in `meta.json`: a member
whose bytes changed since it was saved is named (`CorruptCheckpoint`), and the
provenance records the checksums of the bytes actually read.

Each file is hashed with the checksum its run recorded for verifying
(`FileRecord.checksum()`: xxh3-128, or sha256 for checkpoints saved before
ladle recorded xxh3-128); a file no run describes gets an xxh3-128, which
costs a small fraction of reading it (see `ladle.store.checksums`).

Members whose reader cannot say where a tensor lies in its file (legacy
pickles, tensors made in memory) are hashed whole at the end; in-memory state
dicts have no file and no checksum.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from ladle.averaging.members import Member
from ladle.errors import CorruptCheckpoint
from ladle.formats.source import TensorSource
from ladle.store.checksums import XXH3_128, Checksum, new_digest
from ladle.store.paths import open_ranged, path_isfile
from ladle.store.ranged import RangedFile

log = logging.getLogger("ladle")

_GAP_CHUNK = 4 << 20
"""Bytes read at a time when filling a gap the engine did not read."""


def _expected(source: TensorSource, path: str) -> Checksum | None:
    """The checksum a run recorded for verifying one backing file of `source`, if any."""
    record = source.recorded.get(path)
    return record.checksum() if record is not None else None


def _hashers(source: TensorSource) -> dict[str, FileHasher]:
    """A hasher for each local or stored backing file of `source`, by path: the checksum its
    run recorded for verifying, else xxh3-128."""
    hashers = {}
    for path in source.files:
        if path_isfile(path):
            expected = _expected(source, path)
            hashers[path] = FileHasher(path, expected.algorithm if expected is not None else XXH3_128)
    return hashers


class FileHasher:
    """The checksum of one file, fed with blocks read elsewhere; gaps are read from the file."""

    def __init__(self, path: str, algorithm: str) -> None:
        self.path = path
        self.algorithm = algorithm
        self._digest = new_digest(algorithm)
        self._pos = 0
        self._reader: RangedFile | None = None  # local file or object on a store (ranged reads)

    def feed(self, offset: int, data: memoryview) -> None:
        """Bytes [offset, offset + len(data)) of the file, as read."""
        end = offset + len(data)
        if end <= self._pos:
            return  # read again out of order: already hashed
        if offset > self._pos:
            self._fill(offset)
        self._digest.update(data[self._pos - offset :])
        self._pos = end

    def _fill(self, upto: int | None) -> None:
        if self._reader is None:
            self._reader = open_ranged(self.path)
        while upto is None or self._pos < upto:
            want = _GAP_CHUNK if upto is None else min(_GAP_CHUNK, upto - self._pos)
            chunk = self._reader.read(self._pos, want)
            if not chunk:
                break
            self._digest.update(chunk)
            self._pos += len(chunk)

    def finish(self) -> Checksum:
        """Hash the rest of the file; the checksum of everything."""
        try:
            self._fill(None)
        finally:
            self.close()
        return Checksum(self.algorithm, self._digest.hexdigest())

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None


@dataclass(frozen=True)
class Mismatch:
    """One backing file whose bytes differ from its recorded checksum."""

    member: Member | None
    """The member it backs (None for a source read outside an average)."""
    file: str
    recorded: Checksum
    read: Checksum

    def message(self) -> str:
        return (
            f"{self.file}: the bytes read hash to {self.read} but its meta.json recorded "
            f"{self.recorded.hex[:12]}…; the file changed after it was saved: restore it, or leave it out "
            "(skip_corrupt=True, --skip-corrupt)"
        )


def corrupt_error(mismatches: Sequence[Mismatch]) -> CorruptCheckpoint:
    """One line naming the first corrupted file (and how many more there are)."""
    more = f" (and {len(mismatches) - 1} more corrupted file(s))" if len(mismatches) > 1 else ""
    return CorruptCheckpoint(mismatches[0].message() + more)


class StreamHasher:
    """Hashes members while the engine reads them; `finish()` checks them.

    The engine asks `buffer()` for where to read each block, then hands the block
    over with `feed()`. A block that is a view of a mapped file joins its member's
    batch (consecutive blocks of a key merge into one range); a batch of `CHUNK`
    bytes goes to the hashing threads as one job, which hashes it and then drops
    its pages. Few large jobs matter: every job costs the engine thread a hand-over
    and the GIL twice, and every page drop costs an interrupt of the other CPUs, so
    hashing 1 MiB at a time made the engine wait on bookkeeping rather than work.
    A block read into a buffer (a file on a store) is sent at once: its buffer is
    one of a small ring, reused only once its block is hashed.

    One thread per member, leaving one CPU to the engine's thread: the engine is the
    critical path, and a hashing thread that takes its CPU delays every block after
    (on two CPUs, one hashing thread instead of two made a warm average of five 256 MB
    pickles 6-15% faster). Any thread hashes any member, so five members keep the threads
    equally busy; a member's jobs still run in the order it was read (each job first waits for the
    member's previous one, which a FIFO pool has always started by then). At most
    `AHEAD` jobs per member are queued before the engine waits, which bounds the
    pages mapped at once to about (AHEAD + 1) x CHUNK per member.
    """

    CHUNK = 2 << 20
    AHEAD = 2

    def __init__(self, members: Sequence[Member], block_bytes: int, *, threads: int | None = None) -> None:
        self.members = list(members)
        count = threads or min(len(self.members), max(1, _usable_cpus() - 1))
        self._pool = ThreadPoolExecutor(max_workers=max(1, count), thread_name_prefix="ladle-hash")
        self._hashers = [_hashers(m.source) for m in self.members]
        self._spans: list[dict[str, tuple[str, int] | None]] = [{} for _ in self.members]
        self._ring = [torch.empty(block_bytes, dtype=torch.uint8) for _ in range(4 * max(1, count) + 2)]
        self._busy: list[Future[None] | None] = [None] * len(self._ring)
        self._slot_of = {b.untyped_storage().data_ptr(): n for n, b in enumerate(self._ring)}
        self._turn = 0
        self._batches: list[list[_Piece | _Release]] = [[] for _ in self.members]
        self._batch_bytes = [0] * len(self.members)
        self._queued: list[deque[Future[None]]] = [deque() for _ in self.members]

    def buffer(self) -> torch.Tensor:
        """The next free buffer of the ring (waits until its previous block is hashed)."""
        self._turn = (self._turn + 1) % len(self._ring)
        pending = self._busy[self._turn]
        if pending is not None:
            pending.result()
            self._busy[self._turn] = None
        return self._ring[self._turn]

    def _span(self, index: int, key: str) -> tuple[str, int] | None:
        spans = self._spans[index]
        if key not in spans:
            found = self.members[index].source.span(key)
            spans[key] = found if found is not None and found[0] in self._hashers[index] else None
        return spans[key]

    def feed(self, index: int, key: str, start: int, count: int, block: torch.Tensor) -> None:
        """Member `index` read `block`, elements [start, start + count) of `key` (in the current
        buffer, or a view of a mapped file). Once it is hashed, the member's source drops the
        block's pages (`release_block`): dropped before, the hash would map them again."""
        source = self.members[index].source
        span = self._span(index, key)
        if span is None:
            if self._batches[index]:
                self._batches[index].append(_Release(source, key, (start, count)))  # in order
            else:
                source.release_block(key, start, count)
            return
        path, offset = span
        batch = self._batches[index]
        last = batch[-1] if batch else None
        nbytes = count * block.element_size()
        slot = self._slot_of.get(block.untyped_storage().data_ptr())
        if slot is None and isinstance(last, _Piece) and last.continues(key, start, block):
            last.count += count
        else:
            hasher = self._hashers[index][path]
            batch.append(_Piece(hasher, offset, source, key, start, count, block.reshape(-1)))
        self._batch_bytes[index] += nbytes
        if slot is not None:
            self._busy[slot] = self._send(index)
        elif self._batch_bytes[index] >= self.CHUNK:
            self._send(index)

    def release(self, index: int, key: str) -> None:
        """The engine is done with `key` of member `index`: its source releases it once every
        block of it handed over is hashed (released now, the hash would map it again)."""
        self._batches[index].append(_Release(self.members[index].source, key, None))

    def _send(self, index: int) -> Future[None] | None:
        """Hand member `index`'s batch to the hashing threads (after the member's previous one)."""
        batch = self._batches[index]
        if not batch:
            return None
        queued = self._queued[index]
        while len(queued) >= self.AHEAD:
            queued.popleft().result()
        previous = queued[-1] if queued else None
        future = self._pool.submit(_run_batch, previous, batch)
        queued.append(future)
        self._batches[index] = []
        self._batch_bytes[index] = 0
        return future

    def finish(self) -> list[Mismatch]:
        """Hash what is left of every file, record the checksums read, and list the mismatches."""
        for i in range(len(self.members)):
            self._send(i)
        for queued in self._queued:
            while queued:
                queued.popleft().result()
        futures = {
            (i, path): self._pool.submit(hasher.finish)
            for i, hashers in enumerate(self._hashers)
            for path, hasher in hashers.items()
        }
        digests = {where: future.result() for where, future in futures.items()}
        self.close()
        mismatches: list[Mismatch] = []
        for i, member in enumerate(self.members):
            files = list(self._hashers[i])
            if not files:
                continue
            read = {path: digests[(i, path)] for path in files}
            mismatches.extend(Mismatch(member, *found) for found in _differing(member.source, read))
            member.read_checksums = read
        return mismatches

    def close(self) -> None:
        """Stop the hashing threads (idempotent); open files are closed."""
        self._pool.shutdown(wait=True, cancel_futures=True)
        for hashers in self._hashers:
            for hasher in hashers.values():
                hasher.close()


@dataclass(slots=True)
class _Piece:
    """Consecutive blocks of one key, read as views of one mapping: hashed with one call."""

    hasher: FileHasher
    offset: int
    """Where the key starts in the file."""
    source: TensorSource
    key: str
    start: int
    count: int
    first: torch.Tensor
    """The first block (flat): the piece's elements follow it in the same storage."""

    def continues(self, key: str, start: int, block: torch.Tensor) -> bool:
        """Whether `block` (elements from `start` of `key`) lies right after this piece in memory."""
        first = self.first
        return (
            key == self.key
            and start == self.start + self.count
            and block.dtype == first.dtype
            and block.untyped_storage().data_ptr() == first.untyped_storage().data_ptr()
            and block.data_ptr() == first.data_ptr() + self.count * first.element_size()
        )

    def run(self) -> None:
        first = self.first
        try:
            flat = first.as_strided((self.count,), (1,), first.storage_offset())
            data = memoryview(flat.view(torch.uint8).numpy())
            self.hasher.feed(self.offset + self.start * first.element_size(), data)
        finally:
            self.source.release_block(self.key, self.start, self.count)


@dataclass(slots=True)
class _Release:
    """Release a block of a source (`block` = (start, count)), or the whole key (None)."""

    source: TensorSource
    key: str
    block: tuple[int, int] | None

    def run(self) -> None:
        if self.block is None:
            self.source.release(self.key)
        else:
            self.source.release_block(self.key, *self.block)


def _run_batch(previous: Future[None] | None, batch: list[_Piece | _Release]) -> None:
    if previous is not None:
        previous.result()  # a member's bytes are hashed in file order
    for item in batch:
        item.run()


def _usable_cpus() -> int:
    """The CPUs this process may run on (its affinity, where the system tells)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _differing(source: TensorSource, read: dict[str, Checksum]) -> list[tuple[str, Checksum, Checksum]]:
    """The files of `source` whose checksum read differs from the one recorded: (path, recorded, read)."""
    found = []
    for path, checksum in read.items():
        expected = _expected(source, path)
        if expected is not None and expected != checksum:
            found.append((path, expected, checksum))
    return found


class VerifiedReader:
    """Reads whole tensors of one source (export, inspection of values) and hashes the bytes
    on the way; `check()` then refuses a file whose bytes differ from its recorded checksum."""

    def __init__(self, source: TensorSource) -> None:
        self.source = source
        self._hashers = _hashers(source)

    def tensor(self, key: str) -> torch.Tensor:
        """`source.tensor(key)`, its bytes hashed when the reader knows where they lie."""
        tensor = self.source.tensor(key)
        span = self.source.span(key)
        if span is not None and span[0] in self._hashers and tensor.is_contiguous() and tensor.numel():
            flat = tensor.detach().reshape(-1).view(torch.uint8)
            self._hashers[span[0]].feed(span[1], memoryview(flat.numpy()))
        return tensor

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Every tensor (ties restored as shared tensors), hashed as read."""
        ties, names = self.source.ties(), self.source.keys()
        out = {key: self.tensor(key) for key in names if key not in ties}
        out.update({alias: out[target] for alias, target in ties.items()})
        return {key: out[key] for key in names}

    def check(self) -> dict[str, Checksum]:
        """Hash the rest of each file; the checksums by path. Raises `CorruptCheckpoint` naming
        the first file whose bytes differ from the checksum its checkpoint recorded."""
        read = {path: hasher.finish() for path, hasher in self._hashers.items()}
        for found in _differing(self.source, read):
            raise CorruptCheckpoint(Mismatch(None, *found).message())
        return read

    def close(self) -> None:
        for hasher in self._hashers.values():
            hasher.close()


def hash_members(members: Sequence[Member]) -> list[Mismatch]:
    """Hash every member's files whole (when the reading does not go through the engine)."""
    hasher = StreamHasher(members, 8)
    return hasher.finish()


def drop_corrupt(members: Sequence[Member], mismatches: Sequence[Mismatch], *, skip: bool) -> list[Member]:
    """The members left once the corrupted ones are refused (an error) or skipped (a warning)."""
    if not mismatches:
        return list(members)
    if not skip:
        raise corrupt_error(mismatches)
    bad = {id(m.member) for m in mismatches if m.member is not None}
    for mismatch in mismatches:
        log.warning("%s; leaving it out of the average", mismatch.message().split("; the file")[0])
    kept = [m for m in members if id(m) not in bad]
    if not kept:
        raise corrupt_error(mismatches)
    return kept


__all__ = [
    "FileHasher",
    "Mismatch",
    "StreamHasher",
    "VerifiedReader",
    "corrupt_error",
    "drop_corrupt",
    "hash_members",
]
