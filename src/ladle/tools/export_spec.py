"""What an export is asked for and what it reports: targets, dtypes, example inputs, tolerances.

Shared by the safetensors export (`ladle.tools.export_weights`), the TorchScript/ONNX
export (`ladle.tools.export_model`) and the front door (`ladle.tools.export`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import torch

from ladle.errors import ConfigError
from ladle.formats.dtypes import parse_dtype


class ExportTarget(str, Enum):
    """What `ladle export` writes."""

    SAFETENSORS = "safetensors"
    TORCHSCRIPT = "torchscript"
    ONNX = "onnx"


class ExportDtype(str, Enum):
    """Floating dtype to cast weights (and the model) to; integer tensors are never cast."""

    BF16 = "bf16"
    FP16 = "fp16"
    FP32 = "fp32"

    @property
    def torch(self) -> torch.dtype:
        return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[self.value]


@dataclass(kw_only=True, frozen=True)
class ExampleInput:
    """One positional input of the model's forward(), made from a seeded generator."""

    shape: tuple[int, ...]
    dtype: torch.dtype = torch.float32
    """Floating inputs are standard normal; integer ones are drawn from [0, high)."""
    high: int = 2
    """Upper bound (exclusive) of integer inputs such as token ids; 2 suits any vocabulary."""

    def __post_init__(self) -> None:
        shape = tuple(self.shape)
        if not shape or any(not isinstance(s, int) or isinstance(s, bool) or s < 1 for s in shape):
            raise ConfigError(
                f"input shape {list(shape)} is not allowed; use positive sizes such as 1,3,224,224"
            )
        object.__setattr__(self, "shape", shape)
        if not isinstance(self.dtype, torch.dtype):
            raise ConfigError(f"input dtype {self.dtype!r} is not a torch dtype")
        if not isinstance(self.high, int) or self.high < 1:
            raise ConfigError(f"high={self.high!r} is not allowed; use an integer >= 1")

    @classmethod
    def parse(cls, shape: str, dtype: str | None = None) -> ExampleInput:
        """From CLI text: `1,3,32,32` (or `1x3x32x32`) and a dtype name such as `int64`."""
        parts = shape.replace("x", ",").replace(" ", "").strip("()[]").split(",")
        try:
            sizes = tuple(int(p) for p in parts if p)
        except ValueError:
            raise ConfigError(
                f"--input-shape {shape!r} is not a shape; use comma-separated sizes like 1,3,32,32"
            ) from None
        return cls(shape=sizes, dtype=parse_dtype(dtype, field="input_dtype") if dtype else torch.float32)

    def make(self, generator: torch.Generator, float_dtype: torch.dtype | None) -> torch.Tensor:
        if self.dtype.is_floating_point:
            value = torch.randn(self.shape, generator=generator, dtype=torch.float32)
            return value.to(float_dtype or self.dtype)
        if self.dtype.is_complex:
            raise ConfigError("complex example inputs are not supported; use a real dtype")
        value = torch.randint(0, self.high, self.shape, generator=generator)
        return value.to(self.dtype)


@dataclass(kw_only=True, frozen=True)
class ExportResult:
    """What an export wrote, from what, and how it checked out."""

    source: str
    output: str
    target: ExportTarget
    weights: str
    """Which weights were exported: "model" (raw), "ema", or the key given."""
    dtype: str | None
    """The cast applied ("bf16", "fp16", "fp32"), or None when kept as saved."""
    tensors: int
    numel: int
    bytes_before: int
    """Bytes of the whole checkpoint on disk (weights, optimizer, training state)."""
    bytes_after: int
    """Bytes of the output."""
    max_abs_diff: float | None = None
    """Largest |exported - eager| over all outputs (torchscript/onnx only)."""
    atol: float | None = None
    rtol: float | None = None
    exporter: str | None = None
    """Which exporter produced the file (onnx: "dynamo" or "torchscript")."""
    inputs: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "output": self.output,
            "target": self.target.value,
            "weights": self.weights,
            "dtype": self.dtype,
            "tensors": self.tensors,
            "numel": self.numel,
            "bytes_before": self.bytes_before,
            "bytes_after": self.bytes_after,
            "max_abs_diff": self.max_abs_diff,
            "atol": self.atol,
            "rtol": self.rtol,
            "exporter": self.exporter,
            "inputs": self.inputs,
        }


def parse_cast(dtype: ExportDtype | str | None) -> ExportDtype | None:
    if dtype is None:
        return None
    try:
        return ExportDtype(dtype)
    except ValueError:
        allowed = ", ".join(repr(d.value) for d in ExportDtype)
        raise ConfigError(f"dtype={dtype!r} is not allowed; use one of {allowed}") from None


def parse_target(target: ExportTarget | str) -> ExportTarget:
    try:
        return ExportTarget(target)
    except ValueError:
        allowed = ", ".join(repr(t.value) for t in ExportTarget)
        raise ConfigError(f"target={target!r} is not allowed; use one of {allowed}") from None


def check_tolerance(name: str, value: float) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool) or not value >= 0:
        raise ConfigError(f"{name}={value!r} is not allowed; use a number >= 0")
    return float(value)


def default_tolerance(dtype: ExportDtype | None) -> tuple[float, float]:
    """(atol, rtol) an export must meet: tight in fp32, looser in half precision."""
    if dtype in (ExportDtype.BF16, ExportDtype.FP16):
        return 1e-2, 1e-2
    return 1e-4, 1e-3
