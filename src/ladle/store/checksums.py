"""sha256 of checkpoint files, and private read-only mappings of local ones.

The commit protocol records a checksum of every file; readers and `verify`
recompute it. Local files are hashed from a mapping (no copy into Python).
"""

from __future__ import annotations

import hashlib
import mmap
import os

from ladle.store.storage import Storage

HASH_CHUNK = 8 << 20


def sha256_file(storage: Storage, path: str) -> str:
    """Hex sha256 of a file, read in large chunks (hashlib releases the GIL)."""
    digest = hashlib.sha256()
    with storage.open(path, "rb") as handle:
        while chunk := handle.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def map_file(path: str) -> mmap.mmap:
    """A private (copy-on-write) mapping of a local file: readable as a buffer without copying it,
    writable so that tensors may view it; writes never reach the file."""
    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        if size == 0:
            return mmap.mmap(-1, 1)
        return mmap.mmap(handle.fileno(), size, access=mmap.ACCESS_COPY)


def sha256_mapped(storage: Storage, path: str) -> str:
    """Hex sha256 of a file; local files are hashed straight from a mapping (no copy into Python)."""
    local = storage.local_path(path)
    if local is None or os.path.getsize(local) == 0:
        return sha256_file(storage, path)
    with map_file(local) as mapped:
        return hashlib.sha256(mapped).hexdigest()
