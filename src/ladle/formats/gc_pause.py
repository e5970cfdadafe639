"""`paused_gc()`: the cyclic garbage collector held off while many small objects are built.

Reading a header of 100,000 tensors builds hundreds of thousands of dicts, lists and
records, and each burst of allocations triggers a collection that walks every object
the process holds: once torch is imported, that is about a million, and collecting
tripled the time of `json.loads` of such a header. None of these objects form
cycles, so nothing is lost by collecting once afterwards instead.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def paused_gc() -> Iterator[None]:
    """Disable the cyclic collector for the block (as it was before, afterwards: nesting is safe)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


__all__ = ["paused_gc"]
