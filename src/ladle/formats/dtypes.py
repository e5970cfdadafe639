"""Torch dtypes by name: the one parser behind every `dtype=`/`--dtype` in ladle.

Accepts torch's own names ("float32", "bfloat16", "int64", "torch.float16") and
the common short forms ("fp32", "bf16", "fp16", "half", "double", "long").
"""

from __future__ import annotations

import torch

from ladle.errors import ConfigError

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


__all__ = ["dtype_name", "parse_dtype", "parse_float_dtype"]
