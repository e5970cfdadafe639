"""Torch dtypes by name: the one parser behind every `dtype=`/`--dtype` in ladle.

Accepts torch's own names ("float32", "bfloat16", "int64", "torch.float16") and
the common short forms ("fp32", "bf16", "fp16", "half", "double", "long").

Also what readers of file headers need without importing torch (about 1.5 s):
element sizes and floating-ness by dtype name (`itemsize`, `is_floating_name`).
Torch is imported only when a torch dtype is asked for.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from ladle.errors import ConfigError

if TYPE_CHECKING:
    import torch

# Bytes per element by torch's dtype name, for the dtypes checkpoints hold; any other
# name is looked up in torch (`itemsize`).
_ITEMSIZE = {
    "float64": 8,
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
    "float8_e4m3fnuz": 1,
    "float8_e5m2fnuz": 1,
    "complex128": 16,
    "complex64": 8,
    "int64": 8,
    "int32": 4,
    "int16": 2,
    "int8": 1,
    "uint64": 8,
    "uint32": 4,
    "uint16": 2,
    "uint8": 1,
    "bool": 1,
    "qint8": 1,
    "quint8": 1,
    "qint32": 4,
    "quint4x2": 1,
    "quint2x4": 1,
}
_FLOATING = frozenset(name for name in _ITEMSIZE if name.startswith(("float", "bfloat")))

_ALIASES = {
    "fp32": "float32",
    "f32": "float32",
    "float": "float32",
    "fp64": "float64",
    "f64": "float64",
    "double": "float64",
    "bf16": "bfloat16",
    "fp16": "float16",
    "f16": "float16",
    "half": "float16",
    "long": "int64",
    "int": "int32",
}
_KEEP = ("", "same", "auto", "members")
"""Names that mean "keep each tensor's own dtype" where a floating dtype is optional."""


def parse_dtype(value: str | torch.dtype, *, field: str = "dtype", floating: bool = False) -> torch.dtype:
    """A torch dtype from a name such as "bf16", "float32" or "int64".

    `floating=True` accepts only floating dtypes (what averaging and casts
    write). `field` names the argument in the error.
    """
    import torch

    if isinstance(value, torch.dtype):
        dtype = value
    else:
        text = str(value).strip().lower().removeprefix("torch.")
        found = getattr(torch, _ALIASES.get(text, text), None) if text else None
        if not isinstance(found, torch.dtype):
            allowed = (
                "float32, bfloat16, float16 or float64" if floating else "e.g. float32, bf16, int64, bool"
            )
            raise ConfigError(f"{field}={value!r} is not a torch dtype; use {allowed}")
        dtype = found
    if floating and not dtype.is_floating_point:
        raise ConfigError(f"{field}={value!r} is not a floating dtype; use float32, bf16, fp16 or float64")
    return dtype


def parse_float_dtype(value: str | torch.dtype | None, *, field: str = "dtype") -> torch.dtype | None:
    """A floating dtype, or None for "keep the members' dtype" (None, "same", "auto", "members")."""
    if value is None or (isinstance(value, str) and value.strip().lower() in _KEEP):
        return None
    return parse_dtype(value, field=field, floating=True)


def dtype_name(dtype: torch.dtype) -> str:
    """ "float32" for torch.float32: the name the parser accepts back."""
    return str(dtype).removeprefix("torch.")


def itemsize(name: str) -> int:
    """Bytes per element of the dtype named `name` ("float32" -> 4), without torch when it can."""
    size = _ITEMSIZE.get(name)
    return size if size is not None else torch_dtype(name).itemsize


def is_floating_name(name: str) -> bool:
    """Whether the dtype named `name` is a floating dtype, without torch when it can."""
    if name in _ITEMSIZE:
        return name in _FLOATING
    return torch_dtype(name).is_floating_point


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype named `name` ("float32" -> torch.float32); imports torch."""
    import torch

    found = getattr(torch, name, None)
    if not isinstance(found, torch.dtype):
        raise ConfigError(f"dtype {name!r} is not a torch dtype in torch {torch.__version__}")
    return found


def torch_loaded() -> bool:
    """Whether torch is already imported (so no value can be a tensor unless it is)."""
    return "torch" in sys.modules


__all__ = ["dtype_name", "is_floating_name", "itemsize", "parse_dtype", "parse_float_dtype", "torch_dtype"]
