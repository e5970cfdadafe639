"""A torch pickle (`torch.save` output) loaded without running code from it.

Files load with `torch.load(weights_only=True, mmap=True)` plus the reviewed
plain-data types of `ladle.formats.safe_globals` (such as timm's
`argparse.Namespace`). A file that needs full unpickling raises `UnsafeLoad`,
naming the classes it would build, unless the caller passes `trust=True`.
"""

from __future__ import annotations

import logging
import pickle
import zipfile
from typing import Any

import torch

from ladle.errors import FormatError, UnsafeLoad, first_line
from ladle.formats.safe_globals import quiet_pickle_warnings, safe_global_names, weights_only_load

log = logging.getLogger("ladle")


def load_torch_file(path: str, *, trust: bool = False) -> tuple[Any, bool]:
    """The unpickled object and whether its storages map the file (loaded with `mmap=True`)."""
    use_mmap = zipfile.is_zipfile(path)
    if not use_mmap and not _legacy_pickle(path):
        raise FormatError(f"{path}: not a readable torch checkpoint (neither a zip archive nor a pickle)")
    if not use_mmap and not _torch_legacy(path):
        # UnsafeLoad, so that inspection still describes its structure (read without running code).
        raise UnsafeLoad(
            f"{path}: a plain pickle (pickle.dump), not a file torch.save wrote; torch cannot "
            "load it: save the weights with torch.save or safetensors"
        )
    try:
        return weights_only_load(path, mmap=use_mmap), use_mmap
    except pickle.UnpicklingError as exc:
        if "Weights only load failed" not in str(exc):
            raise FormatError(f"{path}: not a torch checkpoint ({first_line(exc)})") from None
        if not trust:
            raise UnsafeLoad(
                f"{path}: holds objects other than tensors ({_unsafe_globals(path)}); loading it "
                "runs code from the file: pass trust=True (--trust) only if you trust its source"
            ) from None
    except (RuntimeError, KeyError, EOFError, ValueError, zipfile.BadZipFile) as exc:
        raise FormatError(f"{path}: not a readable torch checkpoint ({first_line(exc)})") from None
    except OSError as exc:
        raise FormatError(f"{path}: cannot read ({exc.strerror or exc})") from None
    log.warning("%s: fully unpickling (trusted)", path)
    try:
        with quiet_pickle_warnings():
            return torch.load(path, map_location="cpu", weights_only=False, mmap=use_mmap), use_mmap
    except Exception as exc:  # a trusted pickle may raise anything while it rebuilds itself
        raise FormatError(f"{path}: cannot be unpickled ({type(exc).__name__}: {first_line(exc)})") from None


def load_torch_object(path: str, *, trust: bool = False) -> Any:
    """The whole object in a torch pickle, loaded weights-only with ladle's allow-list
    (`UnsafeLoad` naming the classes otherwise, unless `trust=True`)."""
    return load_torch_file(path, trust=trust)[0]


# A legacy (non-zip) torch.save file starts with this magic number, pickled with protocol 2.
_TORCH_MAGIC = b"\x80\x02\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little")


def _torch_legacy(path: str) -> bool:
    try:
        with open(path, "rb") as handle:
            return handle.read(len(_TORCH_MAGIC)) == _TORCH_MAGIC
    except OSError:
        return False


def _legacy_pickle(path: str) -> bool:
    """Old `torch.save` files are a bare pickle: they start with the PROTO opcode."""
    try:
        with open(path, "rb") as handle:
            return handle.read(1) == b"\x80"
    except OSError:
        return False


def _unsafe_globals(path: str) -> str:
    """The classes a pickle names beyond torch's and ladle's allow-lists (`safe_globals`)."""
    allowed = safe_global_names()
    try:
        names = [n for n in torch.serialization.get_unsafe_globals_in_checkpoint(path) if n not in allowed]
    except Exception:  # listing is a courtesy for the message; never fail on it
        # Legacy (non-zip) files: torch cannot list them; replay the pickle without running code.
        from ladle.state.pickle_scan import scan_pickle

        try:
            names = [n for n in scan_pickle(path).globals if n not in allowed]
        except Exception:
            return "unknown classes"
    shown = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
    return shown or "unknown classes"
