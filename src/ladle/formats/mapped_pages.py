"""Dropping pages of a read-only file mapping from this process (`madvise(MADV_DONTNEED)`).

Readers that answer with views of a privately mapped file (torch's mapping of a pickle,
ladle's of a safetensors file) hand the pages of what was read back to the kernel, so a
pass over a large file does not stay resident. The mappings are never written, so the
pages stay in the page cache and a later read maps the same bytes again. Linux only; a
no-op elsewhere.
"""

from __future__ import annotations

import ctypes
import mmap
import sys
from typing import Any

_MADV_DONTNEED = 4
_LIBC: Any = None


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
