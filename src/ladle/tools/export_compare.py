"""An exported model's outputs compared with eager PyTorch's, element by element."""

from __future__ import annotations

import math
import os
from typing import Any

import torch

from ladle.errors import ExportMismatch
from ladle.tools.export_spec import ExportTarget


def flatten_outputs(value: Any) -> list[torch.Tensor]:
    """The tensors of a model's output (a tensor, or nested tuples/lists/dicts of them)."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, list | tuple):
        return [t for item in value for t in flatten_outputs(item)]
    if isinstance(value, dict):
        return [t for item in value.values() for t in flatten_outputs(item)]
    return []


def compare_outputs(
    eager: list[torch.Tensor],
    exported: list[torch.Tensor],
    *,
    atol: float,
    rtol: float,
    target: ExportTarget,
    output: str | os.PathLike[str],
) -> float:
    """Largest |exported - eager|; raises ExportMismatch beyond atol + rtol * |eager|."""
    where = os.fspath(output)
    if len(eager) != len(exported):
        raise ExportMismatch(
            f"{where}: the {target.value} export returns {len(exported)} outputs, eager PyTorch "
            f"{len(eager)}; nothing was written"
        )
    max_abs = 0.0
    worst: tuple[int, int, int] | None = None  # (output, bad elements, total)
    for index, (e, x) in enumerate(zip(eager, exported, strict=True)):
        e64, x64 = e.detach().cpu().double(), x.detach().cpu().double()
        if e64.shape != x64.shape:
            raise ExportMismatch(
                f"{where}: output {index} has shape {list(x64.shape)} in the {target.value} export "
                f"but {list(e64.shape)} in eager PyTorch; nothing was written"
            )
        both_nan = torch.isnan(e64) & torch.isnan(x64)
        diff = torch.where(both_nan, torch.zeros_like(e64), (x64 - e64).abs())
        diff = torch.nan_to_num(diff, nan=math.inf)
        if diff.numel():
            max_abs = max(max_abs, float(diff.max()))
        bad = int((diff > atol + rtol * e64.abs().nan_to_num(nan=0.0)).sum())
        if bad and worst is None:
            worst = (index, bad, diff.numel())
    if worst is not None:
        index, bad, total = worst
        raise ExportMismatch(
            f"{where}: the {target.value} export disagrees with eager PyTorch: max |diff| "
            f"{max_abs:.3e}, {bad} of {total} elements of output {index} beyond atol={atol:g} + "
            f"rtol={rtol:g}*|eager|; nothing was written. Look for randomness or data-dependent "
            "control flow in forward(), or loosen --atol/--rtol"
        )
    return max_abs
