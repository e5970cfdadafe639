"""The small, reviewed set of harmless types ladle lets `torch.load(weights_only=True)` rebuild.

Training checkpoints written by common tools hold a few plain-data objects
besides tensors: timm's `CheckpointSaver` and legacy fairseq store the command
line as an `argparse.Namespace`, others keep `pathlib` paths, `datetime`
stamps or numpy scalars. torch's weights-only unpickler refuses them, which
would push users to full unpickling (`--trust`) for files
timm itself loads weights-only by allow-listing `Namespace`.

Every type here only stores data: building one runs no code chosen by the
file (a `Namespace` or a path is constructed from plain values; the builtin
constructors listed turn plain values into plain values; a numpy scalar or
array is rebuilt from a dtype and raw bytes, and an object array still needs
each of its items' classes allowed). Anything else still needs `trust=True`.

`ladle_safe_globals()` applies the list for the duration of one ladle load
(torch's mechanism is process-wide, so the context adds only what is not
allowed already and removes only what it added, under a lock and a count so
concurrent ladle loads share it); nothing is ever left allowed after ladle
returns. Keep this list short and review every addition: an entry that can
call arbitrary code (`getattr`, `eval`, `functools.partial`, a class with a
side-effecting `__setstate__`) defeats weights-only loading for every user.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime
import pathlib
import threading
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch

SafeGlobal = Callable[..., Any] | tuple[Callable[..., Any], str]

_LOCK = threading.Lock()
_USERS = 0
_ADDED: list[SafeGlobal] = []


def _paths() -> list[SafeGlobal]:
    """pathlib classes under their own name and the name older Pythons pickled them under."""
    out: list[SafeGlobal] = []
    for cls in (
        pathlib.PurePath,
        pathlib.PurePosixPath,
        pathlib.PureWindowsPath,
        pathlib.Path,
        pathlib.PosixPath,
        pathlib.WindowsPath,
    ):
        out.append(cls)
        if cls.__module__ != "pathlib":  # Python 3.13 moved them to pathlib._local
            out.append((cls, f"pathlib.{cls.__qualname__}"))
    return out


def _numpy() -> list[SafeGlobal]:
    """numpy scalars, dtypes and arrays of plain numbers, as torch's docs suggest allowing them."""
    try:
        import numpy as np
    except ImportError:
        return []
    core = getattr(np, "_core", None) or np.core
    multiarray = core.multiarray
    out: list[SafeGlobal] = [np.dtype, np.ndarray]
    for func in (multiarray.scalar, multiarray._reconstruct):
        out.append(func)
        # Files written under numpy 1.x name `numpy.core`, under 2.x `numpy._core`.
        for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
            out.append((func, f"{module}.{func.__name__}"))
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        out.extend(
            getattr(dtypes, name)
            for name in dir(dtypes)
            if name.endswith("DType") and isinstance(getattr(dtypes, name), type)
        )
    return out


def safe_global_list() -> list[SafeGlobal]:
    """Every type and constructor ladle allows on top of torch's own weights-only list."""
    return [
        argparse.Namespace,
        collections.OrderedDict,
        # Constructors that plain data's reduce may name. (`defaultdict` and `deque` cannot be
        # allowed: torch's unpickler fills only dicts, OrderedDicts and lists.)
        list,
        dict,
        tuple,
        int,
        float,
        str,
        bool,
        frozenset,
        slice,
        range,
        datetime.datetime,
        datetime.date,
        datetime.time,
        datetime.timedelta,
        datetime.timezone,
        *_paths(),
        *_numpy(),
    ]


def safe_global_names() -> frozenset[str]:
    """The pickle names (`module.qualname`) of `safe_global_list()`, for messages and scans."""
    names = set()
    for entry in safe_global_list():
        if isinstance(entry, tuple):
            names.add(entry[1])
        else:
            names.add(f"{entry.__module__}.{entry.__qualname__}")
    return frozenset(names)


@contextlib.contextmanager
def ladle_safe_globals() -> Iterator[None]:
    """Allow `safe_global_list()` in `torch.load(weights_only=True)` for the duration of the block.

    Only entries torch does not already allow are added, and they are removed
    when the last concurrent ladle load leaves, so a user's own
    `add_safe_globals` survives and nothing stays allowed afterwards.
    """
    global _USERS
    with _LOCK:
        if _USERS == 0:
            present = torch.serialization.get_safe_globals()
            _ADDED[:] = [g for g in safe_global_list() if g not in present]
            torch.serialization.add_safe_globals(_ADDED)
        _USERS += 1
    try:
        yield
    finally:
        with _LOCK:
            _USERS -= 1
            if _USERS == 0 and _ADDED:
                # torch offers no public remove: keep what others allowed, drop ours.
                kept = [g for g in torch.serialization.get_safe_globals() if g not in _ADDED]
                torch.serialization.clear_safe_globals()
                torch.serialization.add_safe_globals(kept)
                _ADDED.clear()


def weights_only_load(path: str, *, mmap: bool = False) -> Any:
    """`torch.load(path, weights_only=True)` on the CPU with ladle's allow-list in force."""
    with ladle_safe_globals(), quiet_pickle_warnings():
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)


@contextlib.contextmanager
def quiet_pickle_warnings() -> Iterator[None]:
    """Silence torch's two-line UserWarning about a pickle's protocol: the error ladle
    raises for such a file (or nothing, when it loads) is all the user needs to see."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
        yield


__all__ = [
    "ladle_safe_globals",
    "safe_global_list",
    "safe_global_names",
    "weights_only_load",
]
