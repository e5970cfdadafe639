"""See what a pickle holds without running any code from it.

`torch.load(weights_only=True)` refuses pickles that name classes outside its
allow-list (an `argparse.Namespace` of hyper-parameters, a Lightning callback,
a numpy array). Unpickling those for real would run code from the file. To
still tell the user what such a file holds (its top-level keys, where the
tensors are, which classes it needs), `scan_pickle` replays the pickle with an
unpickler whose every global is a harmless stand-in: calls, `__new__` and
`__setstate__` on a stand-in only record their arguments, and tensor storages
are never read. The result has the file's structure with `Opaque` objects
where arbitrary classes would have been built.
"""

from __future__ import annotations

import io
import pickle
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from typing import IO, Any

import torch

from ladle.errors import FormatError

# The legacy (pre-zip) torch format starts with this pickled integer.
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


@dataclass(kw_only=True, frozen=True)
class TensorStub:
    """A tensor's shape and dtype as recorded in a pickle; its data is never read."""

    shape: tuple[int, ...]
    dtype: torch.dtype | None

    @property
    def numel(self) -> int:
        n = 1
        for size in self.shape:
            n *= int(size)
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * (self.dtype.itemsize if self.dtype is not None else 0)


@dataclass(kw_only=True, frozen=True)
class _StorageStub:
    dtype: torch.dtype | None


class Opaque:
    """Stands in for an object of a class the pickle names; holds what it was built from."""

    global_name = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> Opaque:
        obj = super().__new__(cls)
        obj.args = args
        obj.state = None
        obj.items = {}
        obj.list = []
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __setitem__(self, key: Any, value: Any) -> None:
        self.items[key] = value

    def append(self, value: Any) -> None:
        self.list.append(value)

    def extend(self, values: Any) -> None:
        self.list.extend(values)

    def __repr__(self) -> str:
        return f"<{self.global_name}>"


def _storage_dtypes() -> dict[str, torch.dtype]:
    """`{"FloatStorage": torch.float32, ...}`: the storage classes torch pickles name."""
    try:
        table = torch.storage._dtype_to_storage_type_map()
    except AttributeError:  # a private helper; fall back to the common names
        table = {
            torch.float32: "FloatStorage",
            torch.float64: "DoubleStorage",
            torch.float16: "HalfStorage",
            torch.bfloat16: "BFloat16Storage",
            torch.int64: "LongStorage",
            torch.int32: "IntStorage",
            torch.uint8: "ByteStorage",
            torch.bool: "BoolStorage",
        }
    return {name: dtype for dtype, name in table.items()}


def _storage_dtype(storage_type: Any) -> torch.dtype | None:
    module, _, attr = getattr(storage_type, "global_name", "").rpartition(".")
    return _storage_dtypes().get(attr) if module == "torch" else None


def is_storage_global(name: str) -> bool:
    """Whether `module.name` is one of torch's storage classes (harmless in any checkpoint)."""
    module, _, attr = name.rpartition(".")
    return module == "torch" and (attr in _storage_dtypes() or attr == "UntypedStorage")


def _rebuild_tensor(storage: Any, offset: Any, size: Any, *rest: Any) -> TensorStub:
    dtype = storage.dtype if isinstance(storage, _StorageStub) else None
    return TensorStub(shape=tuple(int(s) for s in size), dtype=dtype)


def _rebuild_parameter(data: Any, *rest: Any) -> Any:
    return data


def _rebuild_from_type(func: Any, new_type: Any, args: Any, state: Any) -> Any:
    return func(*args) if callable(func) else Opaque()


# Globals replaced by safe functions that keep the information inspection needs.
_KNOWN: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type,
}


class _ScanUnpickler(pickle.Unpickler):
    """Every global becomes a recording stand-in; nothing from the file is executed."""

    def __init__(self, file: IO[bytes]) -> None:
        super().__init__(file)
        self.globals_seen: list[str] = []

    def find_class(self, module: str, name: str) -> Any:
        known = _KNOWN.get((module, name))
        if known is not None:
            return known
        qualified = f"{module}.{name}"
        if qualified not in self.globals_seen and not is_storage_global(qualified):
            self.globals_seen.append(qualified)
        return type(name, (Opaque,), {"global_name": qualified})

    def persistent_load(self, pid: Any) -> Any:
        if isinstance(pid, tuple) and len(pid) >= 2 and pid[0] == "storage":
            return _StorageStub(dtype=_storage_dtype(pid[1]))
        return Opaque()


@dataclass(kw_only=True, frozen=True)
class PickleScan:
    """What a pickle holds: its structure (with stand-ins) and the classes it names."""

    obj: Any
    globals: list[str]
    """Every module.name the pickle refers to, beyond the few ladle understands."""


def scan_pickle(path: str) -> PickleScan:
    """Replay the pickle in `path` (torch zip, legacy torch or plain) without running code."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                names = [n for n in archive.namelist() if n.endswith("data.pkl")]
                if not names:
                    raise FormatError(f"{path}: a zip file without data.pkl; not a torch checkpoint")
                data = archive.read(min(names, key=len))
            return _scan(io.BytesIO(data))
        with open(path, "rb") as handle:
            first = _scan(handle)
            if first.obj == _LEGACY_MAGIC:
                _scan(handle)  # protocol version
                _scan(handle)  # system info
                return _scan(handle)
            return first
    except FormatError:
        raise
    except (
        pickle.UnpicklingError,
        EOFError,
        ValueError,
        TypeError,
        AttributeError,
        IndexError,
        KeyError,
        zipfile.BadZipFile,
    ) as exc:
        raise FormatError(f"{path}: not a readable pickle ({type(exc).__name__}: {exc})") from None
    except OSError as exc:
        raise FormatError(f"{path}: cannot read ({exc.strerror or exc})") from None


def _scan(handle: IO[bytes]) -> PickleScan:
    unpickler = _ScanUnpickler(handle)
    obj = unpickler.load()
    return PickleScan(obj=obj, globals=unpickler.globals_seen)
