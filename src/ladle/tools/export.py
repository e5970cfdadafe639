"""`ladle export`: turn a training checkpoint into something to ship.

Three targets:
- `safetensors` (default): the weights only, raw or EMA, optionally cast to
  bf16/fp16/fp32; optimizer and other training state are dropped. Streamed
  tensor by tensor, so a checkpoint of any size exports in constant memory.
- `torchscript` and `onnx`: need the model's code (`model="pkg.module:factory"`)
  and an example input shape. After exporting, the exported model is run on the
  same seeded input as eager PyTorch (onnxruntime for ONNX) and the largest
  absolute difference is reported; beyond the tolerance the export fails with
  `ExportMismatch` and nothing is written.

Every output is written to a temporary file and moved into place only when
complete (and, for models, verified), so a failed export leaves nothing behind.

This module is the front door (`export_checkpoint`); the pieces are
`ladle.tools.export_spec` (targets, dtypes, example inputs, the result),
`ladle.tools.export_weights` (safetensors), `ladle.tools.export_model`
(TorchScript/ONNX) and `ladle.tools.export_compare` (exported against eager).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from ladle.errors import ConfigError
from ladle.tools.export_model import export_model
from ladle.tools.export_spec import ExampleInput, ExportDtype, ExportResult, ExportTarget, parse_target
from ladle.tools.export_weights import export_weights
from ladle.tools.model_factory import ModelSpec


def export_checkpoint(
    checkpoint: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    to: ExportTarget | str = ExportTarget.SAFETENSORS,
    model: ModelSpec | None = None,
    inputs: Sequence[ExampleInput | Sequence[int]] = (),
    ema: bool = False,
    key: str | None = None,
    dtype: ExportDtype | str | None = None,
    atol: float | None = None,
    rtol: float | None = None,
    opset: int | None = None,
    strip_prefix: str | Sequence[str] | None = (),
    trust: bool = False,
    force: bool = False,
    seed: int = 0,
) -> ExportResult:
    """One front door: safetensors weights by default, or a verified TorchScript/ONNX model."""
    chosen = parse_target(to)
    common: dict[str, Any] = {
        "ema": ema,
        "key": key,
        "dtype": dtype,
        "strip_prefix": strip_prefix,
        "trust": trust,
        "force": force,
    }
    if chosen is ExportTarget.SAFETENSORS:
        model_only = {"model": model, "inputs": inputs or None, "atol": atol, "rtol": rtol, "opset": opset}
        given = [name for name, value in model_only.items() if value is not None]
        if given:
            raise ConfigError(
                f"{', '.join(given)} only apply to torchscript/onnx exports; "
                "drop them or choose --to torchscript or --to onnx"
            )
        return export_weights(checkpoint, output, **common)
    if model is None:
        raise ConfigError(
            f"exporting to {chosen.value} needs the model's code: --model module:factory "
            "(a zero-argument callable returning the nn.Module)"
        )
    return export_model(
        checkpoint,
        output,
        model=model,
        inputs=inputs,
        target=chosen,
        atol=atol,
        rtol=rtol,
        opset=opset,
        seed=seed,
        **common,
    )
