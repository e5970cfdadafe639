"""The settings of an EMA (`EMAConfig`) and its decay schedule: validated on creation, stored
in the EMA's state_dict so a resumed run averages with the settings it started with.

The averaging object itself is `ladle.averaging.ema.EMA`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from enum import Enum
from typing import Any

import torch

from ladle.errors import ConfigError
from ladle.validation import check_int, check_number, parse_enum


class Warmup(str, Enum):
    """How the decay grows during the first updates (n counts averaging updates from 0)."""

    NONE = "none"
    """Constant decay from the first update."""
    RATIO = "ratio"
    """`min(decay, (1 + n) / (10 + n))`, TensorFlow's `num_updates` schedule."""
    POWER = "power"
    """`min(decay, 1 - (1 + n) ** -power)`, the schedule of Karras et al. and ema-pytorch."""


class Buffers(str, Enum):
    """What the EMA does with buffers (BatchNorm running statistics and the like)."""

    COPY = "copy"
    """Average parameters only; buffers are copied from the model at each update."""
    AVERAGE = "average"
    """Average floating-point buffers too. Integer and bool buffers are always copied."""


@dataclass(kw_only=True, frozen=True)
class EMAConfig:
    """The settings of an EMA; validated on creation, stored in its state_dict."""

    decay: float = 0.999
    """Weight of the old average at each update, in [0, 1]; 0.999 averages ~1000 updates."""
    warmup: Warmup = Warmup.NONE
    """Decay schedule for the first updates, so early (random) weights fade out fast."""
    power: float = 2 / 3
    """Exponent of the `power` warm-up; 2/3 suits ~1M steps, 3/4 shorter runs."""
    every: int = 1
    """Average once every `every` steps (steps counted by `update()` calls or `step=`)."""
    start_after: int = 0
    """Up to and including this step the EMA copies the raw weights; averaging starts after."""
    buffers: Buffers = Buffers.COPY
    """Copy buffers from the model (default) or average floating buffers too."""
    device: torch.device | None = None
    """Where the EMA copy lives ("cpu" saves accelerator memory); default: beside each weight.
    For a sharded (DTensor) model: where each rank's local shard of the copy lives."""
    dtype: torch.dtype | None = None
    """Floating dtype of the EMA copy (torch.float32 for a bf16 model); default: the weight's."""

    def __post_init__(self) -> None:
        check_number("decay", self.decay, low=0.0, high=1.0)
        object.__setattr__(self, "warmup", parse_enum(Warmup, self.warmup, "warmup"))
        object.__setattr__(self, "buffers", parse_enum(Buffers, self.buffers, "buffers"))
        check_number("power", self.power, low=0.0, open_low=True)
        check_int("every", self.every, low=1)
        check_int("start_after", self.start_after, low=0)
        if self.device is not None and not isinstance(self.device, torch.device):
            try:
                object.__setattr__(self, "device", torch.device(self.device))
            except (RuntimeError, TypeError):
                raise ConfigError(
                    f"device={self.device!r} is not a torch device; use e.g. 'cpu' or 'cuda:0'"
                ) from None
        if self.dtype is not None and (
            not isinstance(self.dtype, torch.dtype) or not self.dtype.is_floating_point
        ):
            raise ConfigError(f"dtype={self.dtype!r} is not a floating torch dtype; use e.g. torch.float32")

    def decay_at(self, n: int) -> float:
        """The decay used by averaging update number `n` (0 for the first)."""
        if self.warmup is Warmup.RATIO:
            return min(self.decay, (1.0 + n) / (10.0 + n))
        if self.warmup is Warmup.POWER:
            return min(self.decay, 1.0 - (1.0 + n) ** -self.power)
        return self.decay

    def to_dict(self) -> dict[str, Any]:
        """Plain values (strings for enums, devices and dtypes), as stored in a checkpoint."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Enum):
                value = value.value
            elif isinstance(value, torch.device | torch.dtype):
                value = str(value)
            out[f.name] = value
        return out
