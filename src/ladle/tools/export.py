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
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import torch
from torch import nn

from ladle._version import __version__
from ladle.errors import (
    ConfigError,
    ExportFailed,
    ExportMismatch,
    FormatError,
    MissingDependency,
)
from ladle.formats import TensorInfo, TensorSource, atomic_path, load_source
from ladle.formats.write import SafetensorsWriter
from ladle.state.model_weights import check_model_fits, load_model_weights
from ladle.store.refs import resolve_checkpoint
from ladle.tools.model_factory import ModelSpec, build_model

log = logging.getLogger("ladle")

# Keys that hold EMA weights in other tools' pickles (timm, common training scripts).
_EMA_KEYS = ("ema", "model_ema", "state_dict_ema", "ema_state_dict", "ema_model")
_ONNX_SIZE_LIMIT = 2 * 1024**3  # protobuf's limit on one ONNX file


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
        return cls(shape=sizes, dtype=parse_dtype(dtype) if dtype else torch.float32)

    def make(self, generator: torch.Generator, float_dtype: torch.dtype | None) -> torch.Tensor:
        if self.dtype.is_floating_point:
            value = torch.randn(self.shape, generator=generator, dtype=torch.float32)
            return value.to(float_dtype or self.dtype)
        if self.dtype.is_complex:
            raise ConfigError("complex example inputs are not supported; use a real dtype")
        value = torch.randint(0, self.high, self.shape, generator=generator)
        return value.to(self.dtype)


def parse_dtype(name: str) -> torch.dtype:
    """`"float32"`, `"int64"`, `"bf16"`, `"torch.float16"` -> a torch dtype."""
    aliases = {
        "bf16": "bfloat16",
        "fp16": "float16",
        "half": "float16",
        "fp32": "float32",
        "float": "float32",
        "fp64": "float64",
        "double": "float64",
        "long": "int64",
        "int": "int32",
    }
    text = name.strip().removeprefix("torch.")
    dtype = getattr(torch, aliases.get(text, text), None)
    if not isinstance(dtype, torch.dtype):
        raise ConfigError(f"{name!r} is not a torch dtype; use e.g. float32, float16, int64, bool")
    return dtype


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


# -- weights -------------------------------------------------------------------------


def _weights_label(ema: bool, key: str | None) -> str | None:
    if ema and key not in (None, "ema"):
        raise ConfigError(f"ema=True and key={key!r} ask for different weights; give one of them")
    return "ema" if ema else key


def open_weights(
    checkpoint: str | os.PathLike[str],
    *,
    ema: bool = False,
    key: str | None = None,
    strip_prefix: str | Sequence[str] | None = (),
    trust: bool = False,
) -> tuple[TensorSource, str]:
    """The weights to export and their label; `ema=True` finds EMA weights in any format."""
    checkpoint = resolve_checkpoint(checkpoint)
    chosen = _weights_label(ema, key)
    if chosen != "ema" or _is_ladle_checkpoint(checkpoint):
        source = load_source(checkpoint, key=chosen, strip_prefix=strip_prefix, trust=trust)
        return source, chosen or "model"
    for candidate in _EMA_KEYS:
        try:
            source = load_source(checkpoint, key=candidate, strip_prefix=strip_prefix, trust=trust)
        except FormatError as exc:
            if "no key" in str(exc) or "no tensors under" in str(exc):
                continue
            raise
        return source, candidate
    raise FormatError(
        f"{os.fspath(checkpoint)}: no EMA weights (looked for keys {', '.join(_EMA_KEYS)}); "
        "name the key that holds them with key= (--key)"
    )


def _is_ladle_checkpoint(path: str | os.PathLike[str]) -> bool:
    return os.path.isfile(os.path.join(os.fspath(path), "meta.json"))


def on_disk_bytes(path: str | os.PathLike[str]) -> int:
    """Bytes of a file, or of every file in a folder (a checkpoint with all its state)."""
    text = os.fspath(path)
    if os.path.isfile(text):
        return os.path.getsize(text)
    total = 0
    for root, _dirs, files in os.walk(text):
        total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
    return total


def _cast(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    if dtype is not None and tensor.is_floating_point() and tensor.dtype != dtype:
        return tensor.to(dtype)
    return tensor


def _parse_cast(dtype: ExportDtype | str | None) -> ExportDtype | None:
    if dtype is None:
        return None
    try:
        return ExportDtype(dtype)
    except ValueError:
        allowed = ", ".join(repr(d.value) for d in ExportDtype)
        raise ConfigError(f"dtype={dtype!r} is not allowed; use one of {allowed}") from None


def export_weights(
    checkpoint: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    ema: bool = False,
    key: str | None = None,
    dtype: ExportDtype | str | None = None,
    strip_prefix: str | Sequence[str] | None = (),
    trust: bool = False,
    force: bool = False,
) -> ExportResult:
    """Write the checkpoint's weights (raw or EMA, optionally cast) as one safetensors file.

    Only tensors are kept: optimizer state, RNG and the rest of the training
    state are dropped. Tied tensors are stored once (`ladle.aliases` metadata).
    The header records where the weights came from (`ladle.source`, `ladle.weights`,
    `ladle.step`).
    """
    checkpoint = resolve_checkpoint(checkpoint)
    cast = _parse_cast(dtype)
    target_dtype = cast.torch if cast else None
    source, label = open_weights(checkpoint, ema=ema, key=key, strip_prefix=strip_prefix, trust=trust)
    with source:
        layout = {}
        for name in source:
            shape, stored = source.info(name)
            is_float = stored.is_floating_point
            layout[name] = TensorInfo(shape, target_dtype if target_dtype and is_float else stored)
        metadata = {
            "ladle.source": os.path.abspath(os.fspath(checkpoint)),
            "ladle.weights": label,
            "ladle.version": __version__,
        }
        if source.step is not None:
            metadata["ladle.step"] = str(source.step)
        if cast:
            metadata["ladle.dtype"] = cast.value
        with atomic_path(output, force=force) as tmp:
            writer = SafetensorsWriter(tmp, layout, metadata=metadata, ties=source.ties())
            try:
                for name in writer.order:
                    writer.write(name, _cast(source.tensor(name), target_dtype))
                    source.release(name)
            finally:
                writer.close()
        numel = sum(layout[k].numel for k in writer.order)
        count = len(layout)
    final = os.path.abspath(os.fspath(output))
    result = ExportResult(
        source=os.path.abspath(os.fspath(checkpoint)),
        output=final,
        target=ExportTarget.SAFETENSORS,
        weights=label,
        dtype=cast.value if cast else None,
        tensors=count,
        numel=numel,
        bytes_before=on_disk_bytes(checkpoint),
        bytes_after=os.path.getsize(final),
    )
    log.info("exported %s weights of %s to %s", label, checkpoint, final)
    return result


# -- models --------------------------------------------------------------------------


def default_tolerance(dtype: ExportDtype | None) -> tuple[float, float]:
    """(atol, rtol) an export must meet: tight in fp32, looser in half precision."""
    if dtype in (ExportDtype.BF16, ExportDtype.FP16):
        return 1e-2, 1e-2
    return 1e-4, 1e-3


def export_model(
    checkpoint: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    model: ModelSpec,
    inputs: Sequence[ExampleInput | Sequence[int]],
    target: ExportTarget | str = ExportTarget.ONNX,
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
    """Export the model with the checkpoint's weights to TorchScript or ONNX, then verify it.

    `model` builds the architecture (a `module:factory` spec or a callable);
    `inputs` gives one example shape per positional input of forward(). The
    exported model runs on a seeded example input (onnxruntime for ONNX) and its
    outputs must match eager PyTorch within `atol + rtol * |eager|` elementwise,
    else `ExportMismatch` is raised and nothing is written.
    """
    checkpoint = resolve_checkpoint(checkpoint)
    chosen = _parse_target(target)
    if chosen is ExportTarget.SAFETENSORS:
        raise ConfigError("export_model writes torchscript or onnx; use export_weights for safetensors")
    cast = _parse_cast(dtype)
    examples = [i if isinstance(i, ExampleInput) else ExampleInput(shape=tuple(i)) for i in inputs]
    if not examples:
        raise ConfigError(
            f"exporting to {chosen.value} needs an example input shape (--input-shape 1,3,32,32)"
        )
    default_atol, default_rtol = default_tolerance(cast)
    atol = default_atol if atol is None else _check_tolerance("atol", atol)
    rtol = default_rtol if rtol is None else _check_tolerance("rtol", rtol)
    if chosen is ExportTarget.ONNX:
        require_onnx()
        if cast is ExportDtype.BF16:
            raise ConfigError(
                "ONNX export in bf16 cannot be checked with onnxruntime (numpy has no bfloat16); "
                "export in fp16 or fp32"
            )
    module = build_model(model)
    source, label = open_weights(checkpoint, ema=ema, key=key, strip_prefix=strip_prefix, trust=trust)
    with source:
        saved = {k: tuple(source.info(k)) for k in source}
        check_model_fits(module, saved, os.fspath(checkpoint))
        weights = source.state_dict()
        load_model_weights(module, weights, strict=True)
        del weights
    if cast is not None:
        module = module.to(cast.torch)
    module.eval()
    generator = torch.Generator().manual_seed(seed)
    example = tuple(e.make(generator, cast.torch if cast else None) for e in examples)
    try:
        with torch.no_grad():
            eager = _flatten(module(*example))
    except Exception as exc:
        shapes = ", ".join(str(list(e.shape)) for e in examples)
        raise ConfigError(
            f"the model fails on the example input {shapes}: {type(exc).__name__}: "
            f"{_first_line(exc)}; pass --input-shape (and --input-dtype) matching its forward()"
        ) from exc
    params = sum(p.numel() for p in module.parameters())
    with atomic_path(output, force=force) as tmp:
        if chosen is ExportTarget.TORCHSCRIPT:
            exported, exporter = _torchscript(module, example, tmp), "torch.jit.trace"
        else:
            _check_onnx_size(module, os.fspath(output))
            exporter = _onnx(module, example, tmp, opset)
            exported = _run_onnx(tmp, example)
        max_abs = _compare(eager, exported, atol=atol, rtol=rtol, target=chosen, output=output)
    final = os.path.abspath(os.fspath(output))
    return ExportResult(
        source=os.path.abspath(os.fspath(checkpoint)),
        output=final,
        target=chosen,
        weights=label,
        dtype=cast.value if cast else None,
        tensors=len(saved),
        numel=params,
        bytes_before=on_disk_bytes(checkpoint),
        bytes_after=os.path.getsize(final),
        max_abs_diff=max_abs,
        atol=atol,
        rtol=rtol,
        exporter=exporter,
        inputs=[
            {"shape": list(e.shape), "dtype": str(x.dtype).removeprefix("torch.")}
            for e, x in zip(examples, example, strict=True)
        ],
    )


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
    chosen = _parse_target(to)
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


def _parse_target(target: ExportTarget | str) -> ExportTarget:
    try:
        return ExportTarget(target)
    except ValueError:
        allowed = ", ".join(repr(t.value) for t in ExportTarget)
        raise ConfigError(f"target={target!r} is not allowed; use one of {allowed}") from None


def _check_tolerance(name: str, value: float) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool) or not value >= 0:
        raise ConfigError(f"{name}={value!r} is not allowed; use a number >= 0")
    return float(value)


def require_onnx() -> None:
    """Raise MissingDependency unless onnx, onnxscript and onnxruntime can be imported."""
    for name in ("onnx", "onnxscript", "onnxruntime"):
        try:
            __import__(name)
        except ImportError:
            raise MissingDependency(
                f"exporting to ONNX needs the optional package {name!r}, which is not installed; "
                "install the extra: pip install 'ladle[onnx]'"
            ) from None


@contextmanager
def _exporter_noise() -> Iterator[list[warnings.WarningMessage]]:
    """Collect the exporters' warnings (deprecations of torch internals, tracer notes)
    and quiet torch.onnx's own logger, so the CLI prints ladle's report, not theirs."""
    onnx_logger = logging.getLogger("torch.onnx")
    level = onnx_logger.level
    onnx_logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield caught
    finally:
        onnx_logger.setLevel(level)
    tracer = [w for w in caught if w.category.__name__ == "TracerWarning"]
    if tracer:
        log.warning(
            "the trace recorded %d Python-side decisions as constants, so the exported model may "
            "not generalise to other input shapes; first: %s",
            len(tracer),
            str(tracer[0].message).splitlines()[0][:160],
        )
    for w in caught:
        if w not in tracer:
            log.debug("exporter warning: %s: %s", w.category.__name__, w.message)


def _torchscript(module: nn.Module, example: tuple[torch.Tensor, ...], path: str) -> list[torch.Tensor]:
    try:
        with _exporter_noise(), torch.no_grad():
            traced = torch.jit.trace(module, example, check_trace=False, strict=False)
            torch.jit.save(traced, path)
            loaded = torch.jit.load(path, map_location="cpu")
            return _flatten(loaded(*example))
    except Exception as exc:
        raise ExportFailed(
            f"{path}: TorchScript tracing failed: {type(exc).__name__}: {_first_line(exc)}; "
            "try --to onnx, or make forward() traceable"
        ) from exc


def _check_onnx_size(module: nn.Module, output: str) -> None:
    nbytes = sum(t.numel() * t.element_size() for t in module.state_dict().values())
    if nbytes >= _ONNX_SIZE_LIMIT:
        raise ExportFailed(
            f"{output}: the model's weights ({nbytes / 1024**3:.1f} GiB) exceed ONNX's 2 GiB "
            "single-file limit; export safetensors, or call torch.onnx.export with external data"
        )


def _onnx(module: nn.Module, example: tuple[torch.Tensor, ...], path: str, opset: int | None) -> str:
    """Export with the torch.export-based exporter; fall back to the TorchScript-based one."""
    first_error: Exception = RuntimeError("no exporter ran")
    for dynamo in (True, False):
        try:
            with _exporter_noise():
                torch.onnx.export(
                    module,
                    example,
                    path,
                    dynamo=dynamo,
                    opset_version=opset,
                    external_data=False,
                    verbose=False,
                )
            return "dynamo" if dynamo else "torchscript"
        except Exception as exc:
            if dynamo:
                first_error = exc
                log.warning(
                    "the torch.export-based ONNX exporter failed (%s: %s); trying the TorchScript-based one",
                    type(exc).__name__,
                    _first_line(exc),
                )
    raise ExportFailed(
        f"{path}: ONNX export failed: {type(first_error).__name__}: {_first_line(first_error)}; "
        "check that forward() is exportable with torch.export, or try --to torchscript"
    ) from first_error


def _run_onnx(path: str, example: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
    import onnxruntime as ort

    try:
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only; its warnings are about graph internals
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        names = [i.name for i in session.get_inputs()]
        if len(names) != len(example):
            raise ExportFailed(
                f"{path}: the ONNX graph takes {len(names)} inputs ({', '.join(names)}) but "
                f"{len(example)} example inputs were given; inputs forward() ignores are dropped"
            )
        feeds = {name: x.detach().cpu().numpy() for name, x in zip(names, example, strict=True)}
        outputs = session.run(None, feeds)
    except ExportFailed:
        raise
    except Exception as exc:
        raise ExportFailed(
            f"{path}: onnxruntime cannot run the exported model: {type(exc).__name__}: "
            f"{_first_line(exc)}; try another --opset or --dtype fp32"
        ) from exc
    return [torch.from_numpy(o) if not isinstance(o, torch.Tensor) else o for o in outputs]


def _flatten(value: Any) -> list[torch.Tensor]:
    """The tensors of a model's output (a tensor, or nested tuples/lists/dicts of them)."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, list | tuple):
        return [t for item in value for t in _flatten(item)]
    if isinstance(value, dict):
        return [t for item in value.values() for t in _flatten(item)]
    return []


def _compare(
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


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:200] if lines else type(exc).__name__
