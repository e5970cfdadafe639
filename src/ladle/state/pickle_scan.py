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
import struct
import zipfile
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import IO, Any

from ladle.errors import FormatError
from ladle.formats.dtypes import itemsize

# The legacy (pre-zip) torch format starts with this pickled integer.
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


@dataclass(kw_only=True, frozen=True)
class TensorStub:
    """A tensor's shape and dtype (torch's name, "float32") as recorded in a pickle; its data
    is never read, and torch is not imported."""

    shape: tuple[int, ...]
    dtype: str | None
    # Where its data lies (for `TorchArchive.scalar`), not what the tensor is: not compared.
    storage_key: str | None = field(default=None, compare=False)
    """The archive record (`data/<key>`) holding its storage, in a torch zip file."""
    offset: int = field(default=0, compare=False)
    """Where it starts in its storage, in elements."""

    @property
    def numel(self) -> int:
        n = 1
        for size in self.shape:
            n *= int(size)
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * (itemsize(self.dtype) if self.dtype is not None else 0)


@dataclass(kw_only=True, frozen=True)
class _StorageStub:
    dtype: str | None
    key: str | None = None


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


# The storage classes torch pickles name -> the dtype each holds (torch's names), as
# `torch.storage._dtype_to_storage_type_map()` lists them; written out so that scanning
# a pickle needs no torch.
_STORAGE_DTYPES = {
    "DoubleStorage": "float64",
    "FloatStorage": "float32",
    "HalfStorage": "float16",
    "LongStorage": "int64",
    "IntStorage": "int32",
    "ShortStorage": "int16",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
    "BFloat16Storage": "bfloat16",
    "ComplexDoubleStorage": "complex128",
    "ComplexFloatStorage": "complex64",
    "QInt8Storage": "qint8",
    "QInt32Storage": "qint32",
    "QUInt8Storage": "quint8",
    "QUInt4x2Storage": "quint4x2",
    "QUInt2x4Storage": "quint2x4",
}


def _storage_dtype(storage_type: Any) -> str | None:
    module, _, attr = getattr(storage_type, "global_name", "").rpartition(".")
    return _STORAGE_DTYPES.get(attr) if module == "torch" else None


def is_storage_global(name: str) -> bool:
    """Whether `module.name` is one of torch's storage classes (harmless in any checkpoint)."""
    module, _, attr = name.rpartition(".")
    return module == "torch" and (attr in _STORAGE_DTYPES or attr == "UntypedStorage")


def _rebuild_tensor(storage: Any, offset: Any, size: Any, *rest: Any) -> TensorStub:
    stub = storage if isinstance(storage, _StorageStub) else _StorageStub(dtype=None)
    start = offset if isinstance(offset, int) and not isinstance(offset, bool) else 0
    return TensorStub(shape=tuple(int(s) for s in size), dtype=stub.dtype, storage_key=stub.key, offset=start)


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
        self.storages: list[tuple[str, str | None, int]] = []

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
            dtype = _storage_dtype(pid[1])
            if len(pid) >= 5 and isinstance(pid[4], int):
                self.storages.append((str(pid[2]), dtype, pid[4]))
            return _StorageStub(dtype=dtype, key=str(pid[2]) if len(pid) >= 3 else None)
        return Opaque()


@dataclass(kw_only=True, frozen=True)
class PickleScan:
    """What a pickle holds: its structure (with stand-ins) and the classes it names."""

    obj: Any
    globals: list[str]
    """Every module.name the pickle refers to, beyond the few ladle understands."""
    storages: list[tuple[str, str | None, int]] = field(default_factory=list)
    """(key, dtype name, elements) of each tensor storage the pickle refers to."""


def scan_pickle(path: str) -> PickleScan:
    """Replay the pickle in `path` (torch zip, legacy torch or plain) without running code."""
    try:
        if zipfile.is_zipfile(path):
            with TorchArchive(path) as archive:
                return archive.scan()
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


class TorchArchive:
    """A torch zip file (what `torch.save` writes), local or on a store, read record by record:
    its pickle replayed without running code (`scan`), and small tensors read from their
    storage records (`scalar`) without reading the others. On a store every read is a ranged
    request, so the weights are never downloaded."""

    def __init__(self, path: str) -> None:
        from ladle.store.paths import open_ranged
        from ladle.store.ranged import RangedIO

        self.path = path
        self._ranged = open_ranged(path)
        try:
            self._zip = zipfile.ZipFile(io.BufferedReader(RangedIO(self._ranged), buffer_size=64 << 10))
            names = [n for n in self._zip.namelist() if n.endswith("data.pkl")]
            if not names:
                raise FormatError(f"{path}: a zip file without data.pkl; not a torch checkpoint")
        except BaseException:
            self._ranged.close()
            raise
        pickled = min(names, key=len)
        self._pickle = pickled
        self._prefix = pickled[: -len("data.pkl")]

    def __enter__(self) -> TorchArchive:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._zip.close()
        self._ranged.close()

    def scan(self) -> PickleScan:
        """The pickle's structure, tensors as `TensorStub`s (nothing runs, no tensor is read)."""
        return _scan(io.BytesIO(self._zip.read(self._pickle)))

    def scalar(self, stub: TensorStub) -> float | None:
        """The value of a one-element float or integer tensor, read from its storage record;
        None for any other tensor, or when the record is missing or short."""
        form = _SCALAR_FORMATS.get(stub.dtype or "")
        if stub.numel != 1 or stub.storage_key is None or form is None:
            return None
        size = itemsize(stub.dtype) if stub.dtype is not None else 0
        try:
            with self._zip.open(f"{self._prefix}data/{stub.storage_key}") as record:
                record.seek(stub.offset * size)
                raw = record.read(size)
        except (KeyError, OSError, zipfile.BadZipFile):
            return None
        if len(raw) != size:
            return None
        if stub.dtype == "bfloat16":  # the upper half of a float32
            return float(struct.unpack("<f", b"\0\0" + raw)[0])
        return float(struct.unpack(form, raw)[0])


_SCALAR_FORMATS = {
    "float64": "<d",
    "float32": "<f",
    "float16": "<e",
    "bfloat16": "<f",
    "int64": "<q",
    "int32": "<i",
}


def _scan(handle: IO[bytes]) -> PickleScan:
    unpickler = _ScanUnpickler(handle)
    obj = unpickler.load()
    return PickleScan(obj=obj, globals=unpickler.globals_seen, storages=unpickler.storages)


def check_torch_archive(path: str) -> list[str] | None:
    """Check the structure of a file torch.save wrote, without torch: the zip container
    opens, its pickle replays (nothing runs), and every tensor storage it refers to is in
    the archive, whole. Raises FormatError for a damaged file.

    Returns the globals the pickle names beyond tensors and plain containers (only
    torch's weights-only loader can judge those), or None for a file that is not a zip
    (the legacy format): then the caller loads it with torch to check it.
    """
    if not zipfile.is_zipfile(path):
        return None
    scan = scan_pickle(path)
    try:
        with zipfile.ZipFile(path) as archive:
            sizes = {info.filename: info.file_size for info in archive.infolist()}
    except (zipfile.BadZipFile, OSError) as exc:
        raise FormatError(f"{path}: not a readable torch checkpoint ({exc})") from None
    pickles = [n for n in sizes if n.endswith("data.pkl")]
    prefix = min(pickles, key=len)[: -len("data.pkl")]
    for key, dtype, numel in scan.storages:
        name = f"{prefix}data/{key}"
        if name not in sizes:
            raise FormatError(f"{path}: tensor storage {key} is missing; the file is damaged")
        need = numel * itemsize(dtype) if dtype is not None else 0
        if sizes[name] < need:
            raise FormatError(
                f"{path}: tensor storage {key} holds {sizes[name]} bytes, not {need}; the file is damaged"
            )
    return scan.globals
