"""Private mappings of local files (`map_private`, `map_file`), and dropping pages of them
from this process (`madvise(MADV_DONTNEED)`).

Readers answer with views of a privately mapped file (torch's mapping of a pickle, ladle's
of a safetensors file or of a resumed checkpoint's files): nothing is copied, and a tensor
may view the bytes. They hand the pages of what was read back to the kernel, so a
pass over a large file does not stay resident. The mappings are never written, so the
pages stay in the page cache and a later read maps the same bytes again. Linux only; a
no-op elsewhere.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import sys
from typing import Any

_MADV_DONTNEED = 4
_LIBC: Any = None


def map_private(fd: int) -> mmap.mmap:
    """A private (copy-on-write) mapping of the whole open file `fd`: readable as a buffer without
    copying it, writable so that tensors may view it; writes never reach the file. An empty file
    gets one anonymous page (a mapping cannot be empty)."""
    size = os.fstat(fd).st_size
    if size == 0:
        return mmap.mmap(-1, 1)
    return mmap.mmap(fd, size, flags=mmap.MAP_PRIVATE)


def map_file(path: str) -> mmap.mmap:
    """`map_private` of the local file at `path` (the mapping outlives the descriptor)."""
    with open(path, "rb") as handle:
        return map_private(handle.fileno())


def inner_pages(address: int, nbytes: int) -> tuple[int, int]:
    """[lo, hi): the whole pages inside [address, address + nbytes) (hi <= lo when none)."""
    page = mmap.PAGESIZE
    return -(-address // page) * page, (address + nbytes) // page * page


def drop_pages(lo: int, hi: int) -> None:
    """Drop the whole pages [lo, hi) of a read-only mapping from this process."""
    if hi <= lo or sys.platform != "linux":
        return
    libc = _libc()
    if libc is not None:
        libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), _MADV_DONTNEED)


def _libc() -> Any:
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL(None, use_errno=True)
            _LIBC.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        except (OSError, AttributeError):
            _LIBC = False
    return _LIBC or None
