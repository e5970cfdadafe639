"""`ladle export CKPT -o OUT`: inference weights (safetensors), or a verified TorchScript/ONNX model."""

from __future__ import annotations

from typing import Annotated

import typer

from ladle.cli.app import app, console, fail, print_json
from ladle.cli.display import examples, human_bytes
from ladle.errors import ExportFailed, ExportMismatch
from ladle.tools.export import export_checkpoint
from ladle.tools.export_spec import ExampleInput, ExportDtype, ExportResult, ExportTarget

EXAMPLE = examples(
    "ladle export runs/exp1/best -o model.safetensors --ema --dtype bf16",
    "ladle export runs/exp1/best -o model.onnx --model mypkg.models:build \\",
    "      --input-shape 1,3,32,32",
    "ladle export CKPT -o lm.pt --to torchscript --model models.py:TinyLM \\",
    "      --input-shape 1,16 --input-dtype int64",
    footer="Exit status: 0 written, 1 the export failed or disagrees with eager PyTorch, 2 bad input.",
)


@app.command("export", epilog=EXAMPLE)
def export_command(
    checkpoint: Annotated[
        str,
        typer.Argument(
            metavar="CKPT", help="A checkpoint: ladle checkpoint folder, .safetensors, .pt/.ckpt, ..."
        ),
    ],
    output: Annotated[str, typer.Option("--output", "-o", help="The file (or URL: s3://...) to write.")],
    to: Annotated[
        ExportTarget | None,
        typer.Option("--to", help="Target format (default: onnx for a .onnx output, else safetensors)."),
    ] = None,
    ema: Annotated[
        bool, typer.Option("--ema", help="Export the EMA weights instead of the raw ones.")
    ] = False,
    key: Annotated[
        str | None, typer.Option("--key", help="Which weights: a weights file or a nested key in a pickle.")
    ] = None,
    dtype: Annotated[
        ExportDtype | None,
        typer.Option("--dtype", help="Cast floating weights (and the model) to this dtype."),
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            help="module:factory building the nn.Module (torchscript/onnx); runs your code.",
        ),
    ] = None,
    input_shape: Annotated[
        list[str] | None,
        typer.Option("--input-shape", help="Example input shape, e.g. 1,3,32,32; once per forward() input."),
    ] = None,
    input_dtype: Annotated[
        list[str] | None,
        typer.Option("--input-dtype", help="dtype of the example input(s): one, or one per --input-shape."),
    ] = None,
    atol: Annotated[
        float | None,
        typer.Option("--atol", help="Absolute tolerance vs eager (default 1e-4; 1e-2 in fp16/bf16)."),
    ] = None,
    rtol: Annotated[
        float | None,
        typer.Option("--rtol", help="Relative tolerance vs eager (default 1e-3; 1e-2 in fp16/bf16)."),
    ] = None,
    opset: Annotated[
        int | None, typer.Option("--opset", help="ONNX opset version (default: the exporter's).")
    ] = None,
    strip_prefix: Annotated[
        list[str] | None,
        typer.Option("--strip-prefix", help="Remove this key prefix ('auto': module., _orig_mod.)."),
    ] = None,
    trust: Annotated[
        bool,
        typer.Option(
            "--trust", help="Allow full unpickling (runs code from the file; only for files you trust)."
        ),
    ] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace OUT if it exists.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """Export a checkpoint for inference.

    By default writes the weights alone as safetensors (optimizer and training
    state dropped), raw or --ema, optionally cast with --dtype, and prints the
    size before and after. With --to torchscript or --to onnx it builds the model
    with --model, loads the weights, exports it, runs the export on a seeded
    example input (onnxruntime for ONNX) and compares with eager PyTorch; the
    largest absolute difference is printed and a disagreement beyond the
    tolerance fails without writing anything.
    """
    target = to or (ExportTarget.ONNX if output.lower().endswith(".onnx") else ExportTarget.SAFETENSORS)
    shapes = list(input_shape or [])
    dtypes = list(input_dtype or [])
    if dtypes and not shapes:
        fail("--input-dtype needs --input-shape")
    if len(dtypes) > 1 and len(dtypes) != len(shapes):
        fail(f"{len(dtypes)} --input-dtype for {len(shapes)} --input-shape; give one, or one per shape")
    if len(dtypes) == 1:
        dtypes = dtypes * len(shapes)
    inputs = [ExampleInput.parse(shape, dtypes[i] if dtypes else None) for i, shape in enumerate(shapes)]
    try:
        result = export_checkpoint(
            checkpoint,
            output,
            to=target,
            model=model,
            inputs=inputs,
            ema=ema,
            key=key,
            dtype=dtype,
            atol=atol,
            rtol=rtol,
            opset=opset,
            strip_prefix=tuple(strip_prefix or ()),
            trust=trust,
            force=force,
        )
    except (ExportMismatch, ExportFailed) as exc:
        fail(str(exc), code=1)
    if as_json:
        print_json(result.to_dict())
    else:
        _show(result)


def _show(result: ExportResult) -> None:
    what = [result.target.value, f"{result.weights} weights"]
    if result.dtype:
        what.append(result.dtype)
    ratio = result.bytes_after / result.bytes_before if result.bytes_before else 0.0
    console.print(f"wrote {result.output} ({', '.join(what)})", markup=False, soft_wrap=True, highlight=False)
    console.print(
        f"size: {human_bytes(result.bytes_before)} checkpoint -> {human_bytes(result.bytes_after)} "
        f"({ratio:.0%}); {result.tensors} tensors",
        markup=False,
        soft_wrap=True,
        highlight=False,
    )
    if result.max_abs_diff is not None:
        inputs = ", ".join(f"{i['shape']} {i['dtype'].replace('torch.', '')}" for i in result.inputs)
        console.print(
            f"checked against eager PyTorch on {inputs}: max |diff| {result.max_abs_diff:.3e} "
            f"(atol {result.atol:g}, rtol {result.rtol:g}; exporter: {result.exporter})",
            markup=False,
            soft_wrap=True,
            highlight=False,
        )
