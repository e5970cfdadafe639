"""The TorchScript and ONNX exports: the model built from its code, loaded with the
checkpoint's weights, exported, then run on a seeded example input and compared with
eager PyTorch (`ladle.tools.export_compare`); beyond the tolerance nothing is written.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from ladle.averaging.integrity import VerifiedReader
from ladle.errors import ConfigError, ExportFailed, MissingDependency, first_line
from ladle.formats import atomic_path
from ladle.formats.write import output_location
from ladle.state.model_weights import check_model_fits, load_model_weights
from ladle.store.paths import path_size
from ladle.store.refs import resolve_checkpoint
from ladle.tools.export_compare import compare_outputs, flatten_outputs
from ladle.tools.export_spec import (
    ExampleInput,
    ExportDtype,
    ExportResult,
    ExportTarget,
    check_tolerance,
    default_tolerance,
    parse_cast,
    parse_target,
)
from ladle.tools.export_weights import on_disk_bytes, open_weights
from ladle.tools.model_factory import ModelSpec, build_model

log = logging.getLogger("ladle")

_ONNX_SIZE_LIMIT = 2 * 1024**3  # protobuf's limit on one ONNX file


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
    chosen = parse_target(target)
    if chosen is ExportTarget.SAFETENSORS:
        raise ConfigError("export_model writes torchscript or onnx; use export_weights for safetensors")
    cast = parse_cast(dtype)
    examples = [i if isinstance(i, ExampleInput) else ExampleInput(shape=tuple(i)) for i in inputs]
    if not examples:
        raise ConfigError(
            f"exporting to {chosen.value} needs an example input shape (--input-shape 1,3,32,32)"
        )
    default_atol, default_rtol = default_tolerance(cast)
    atol = default_atol if atol is None else check_tolerance("atol", atol)
    rtol = default_rtol if rtol is None else check_tolerance("rtol", rtol)
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
        reader = VerifiedReader(source)
        weights = reader.state_dict()
        reader.check()
        load_model_weights(module, weights, strict=True)
        del weights
    if cast is not None:
        module = module.to(cast.torch)
    module.eval()
    generator = torch.Generator().manual_seed(seed)
    example = tuple(e.make(generator, cast.torch if cast else None) for e in examples)
    try:
        with torch.no_grad():
            eager = flatten_outputs(module(*example))
    except Exception as exc:
        shapes = ", ".join(str(list(e.shape)) for e in examples)
        raise ConfigError(
            f"the model fails on the example input {shapes}: {type(exc).__name__}: "
            f"{first_line(exc)}; pass --input-shape (and --input-dtype) matching its forward()"
        ) from exc
    params = sum(p.numel() for p in module.parameters())
    with atomic_path(output, force=force) as tmp:
        if chosen is ExportTarget.TORCHSCRIPT:
            exported, exporter = _torchscript(module, example, tmp), "torch.jit.trace"
        else:
            _check_onnx_size(module, os.fspath(output))
            exporter = _onnx(module, example, tmp, opset)
            exported = _run_onnx(tmp, example)
        max_abs = compare_outputs(eager, exported, atol=atol, rtol=rtol, target=chosen, output=output)
    final = output_location(output)
    return ExportResult(
        source=output_location(checkpoint),
        output=final,
        target=chosen,
        weights=label,
        dtype=cast.value if cast else None,
        tensors=len(saved),
        numel=params,
        bytes_before=on_disk_bytes(checkpoint),
        bytes_after=path_size(final),
        max_abs_diff=max_abs,
        atol=atol,
        rtol=rtol,
        exporter=exporter,
        inputs=[
            {"shape": list(e.shape), "dtype": str(x.dtype).removeprefix("torch.")}
            for e, x in zip(examples, example, strict=True)
        ],
    )


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
            return flatten_outputs(loaded(*example))
    except Exception as exc:
        raise ExportFailed(
            f"{path}: TorchScript tracing failed: {type(exc).__name__}: {first_line(exc)}; "
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
                    first_line(exc),
                )
    raise ExportFailed(
        f"{path}: ONNX export failed: {type(first_error).__name__}: {first_line(first_error)}; "
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
            f"{first_line(exc)}; try another --opset or --dtype fp32"
        ) from exc
    return [torch.from_numpy(o) if not isinstance(o, torch.Tensor) else o for o in outputs]
