"""A DCP folder's `.metadata`, read without running code from it.

`.metadata` is a plain pickle naming every tensor, its full shape and dtype, and where
each shard of it lives. It is read by an unpickler that builds only DCP's own metadata
classes (and torch sizes, dtypes and layouts), or light stand-ins for them, so opening
a folder runs no code from it; `trust=True` unpickles it normally.
"""

from __future__ import annotations

import io
import os
import pickle
from typing import TYPE_CHECKING, Any

from ladle.errors import FormatError

if TYPE_CHECKING:  # imported when metadata is read: `ladle inspect` of a ladle checkpoint needs no torch
    import torch

METADATA_NAME = ".metadata"
SHARD_SUFFIX = ".distcp"
_METADATA_MODULE = "torch.distributed.checkpoint.metadata"
_STORAGE_INFO = ("torch.distributed.checkpoint.filesystem", "_StorageInfo")
_ALLOWED_GLOBALS = {
    _STORAGE_INFO,
    ("torch.serialization", "_get_layout"),
    ("torch", "Size"),
    ("collections", "OrderedDict"),
    # pathlib's classes as this Python pickles them (`pathlib._local` from 3.13) and as older ones did.
    *(
        (module, name)
        for module in ("pathlib", "pathlib._local")
        for name in ("PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath")
    ),
}


def is_dcp_dir(path: str | os.PathLike[str]) -> bool:
    """True when `path` is a folder holding a DCP `.metadata` file."""
    return os.path.isfile(os.path.join(os.fspath(path), METADATA_NAME))


def shard_files(path: str | os.PathLike[str]) -> list[str]:
    """The DCP data files of a folder (`*.distcp`), sorted."""
    text = os.fspath(path)
    return sorted(os.path.join(text, n) for n in os.listdir(text) if n.endswith(SHARD_SUFFIX))


class _Record:
    """Stands in for one of DCP's metadata classes: keeps what it was pickled with.

    Reading names, shapes, dtypes and piece locations needs no behaviour from DCP's
    classes, and importing them imports all of `torch.distributed` (seconds per
    process); the stand-ins keep `ladle ls|inspect|avg` of DCP folders quick.
    """

    def __init__(self, *args: Any) -> None:
        self.args = args

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2 and isinstance(state[1], dict):
            state = {**(state[0] or {}), **state[1]}  # (dict, slots)
        if isinstance(state, dict):
            self.__dict__.update(state)
        else:
            self.state = state


class _TensorProperties(_Record):
    """DCP pickles `TensorProperties` as a tuple: (dtype, layout, requires_grad, memory format, pin)."""

    @property
    def dtype(self) -> torch.dtype:
        return self.state[0] if hasattr(self, "state") else self.__dict__["dtype"]


_STAND_INS: dict[str, type] = {"TensorProperties": _TensorProperties}


class _MetadataUnpickler(pickle.Unpickler):
    """Builds DCP metadata only: any other global named by the pickle is refused.

    With `dcp_classes=False` DCP's own metadata classes are replaced by `_Record`s.
    """

    def __init__(self, file: Any, *, dcp_classes: bool) -> None:
        super().__init__(file)
        self.dcp_classes = dcp_classes

    def find_class(self, module: str, name: str) -> Any:
        if module == _METADATA_MODULE and not name.startswith("__"):
            if not self.dcp_classes:
                return _STAND_INS.setdefault(name, type(name, (_Record,), {}))
            import torch.distributed.checkpoint.metadata as metadata

            found = getattr(metadata, name, None)
            if isinstance(found, type):
                return found
        if (module, name) == _STORAGE_INFO and not self.dcp_classes:
            return _STAND_INS.setdefault(name, type(name, (_Record,), {}))
        import torch

        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refused global {module}.{name}")


def read_metadata(path: str | os.PathLike[str], *, trust: bool = False, dcp_classes: bool = True) -> Any:
    """The `Metadata` of a DCP folder, read without running code from it (unless `trust`).

    `dcp_classes=False` builds light stand-ins instead of DCP's classes (enough to
    read tensors; DCP's own `dcp.load` needs the real ones).
    """
    meta_path = os.path.join(os.fspath(path), METADATA_NAME)
    try:
        with open(meta_path, "rb") as handle:
            data = handle.read()
    except OSError as exc:
        raise FormatError(f"{meta_path}: cannot be read ({exc.strerror}); is this a DCP folder?") from None
    try:
        if trust:
            return pickle.loads(data)  # the caller opted in to running code
        return _MetadataUnpickler(io.BytesIO(data), dcp_classes=dcp_classes).load()
    except pickle.UnpicklingError as exc:
        raise FormatError(
            f"{meta_path}: not plain DCP metadata ({exc}); pass trust=True (--trust) to unpickle it anyway"
        ) from None
    except Exception as exc:
        raise FormatError(
            f"{meta_path}: unreadable DCP metadata ({type(exc).__name__}: {exc}); run `ladle verify`"
        ) from None
