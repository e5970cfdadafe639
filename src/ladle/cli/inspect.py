"""`ladle inspect PATH`: format, tensors, sizes and the training state a checkpoint holds."""

from __future__ import annotations

import fnmatch
from typing import Annotated

import typer
from rich.table import Table
from rich.text import Text

from ladle.cli.app import app, console, fail, print_json
from ladle.cli.display import examples, human_bytes, local_time, number, print_table
from ladle.state.contents import format_count
from ladle.tools.inspection import Inspection, inspect_checkpoint

EXAMPLE = examples(
    "ladle inspect runs/exp1/step-000001000",
    "ladle inspect runs/exp1/step-000001000 --ema --filter 'encoder.*'",
    "ladle inspect lightning.ckpt --json",
)
DEFAULT_LIMIT = 40


@app.command("inspect", epilog=EXAMPLE)
def inspect_command(
    path: Annotated[
        str,
        typer.Argument(
            metavar="PATH",
            help="A checkpoint: ladle checkpoint folder, run (shows its latest), .safetensors, "
            ".pt/.pth/.bin/.ckpt, or a model folder.",
        ),
    ],
    key: Annotated[
        str | None,
        typer.Option("--key", help="Which weights: 'ema' in a ladle checkpoint, a nested key in a pickle."),
    ] = None,
    ema: Annotated[bool, typer.Option("--ema", help="Show the EMA weights (same as --key ema).")] = False,
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
    pattern: Annotated[
        str | None,
        typer.Option("--filter", help="Only tensors whose name matches this glob (or contains it)."),
    ] = None,
    show_all: Annotated[
        bool, typer.Option("--all", help=f"List every tensor (default: the first {DEFAULT_LIMIT}).")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """Show what a checkpoint holds, without running code from it.

    Format, every tensor (name, shape, dtype, bytes), element counts and total
    size; for a ladle checkpoint or a training pickle also its step and metrics
    and which training state it holds (optimizer, scheduler, RNG, EMA, ...).
    """
    if ema and key not in (None, "ema"):
        fail(f"--ema and --key {key} ask for different weights; give one of them")
    result = inspect_checkpoint(
        path, key="ema" if ema else key, strip_prefix=tuple(strip_prefix or ()), trust=trust
    )
    if pattern is not None:
        result.tensors = [t for t in result.tensors if _matches(t.name, pattern)]
        if not result.tensors:
            fail(f"{result.path}: no tensor name matches --filter {pattern!r}")
    if as_json:
        print_json(result.to_dict())
        return
    _show(result, limit=None if show_all else DEFAULT_LIMIT)


def _matches(name: str, pattern: str) -> bool:
    return fnmatch.fnmatchcase(name, pattern) or pattern in name


def _show(result: Inspection, *, limit: int | None) -> None:
    out = console
    out.print(result.path, style="bold", markup=False, soft_wrap=True, highlight=False)
    fmt = "ladle checkpoint" if result.format == "ladle" else result.format
    weights = f" (weights: {result.weights})" if result.weights else ""
    out.print(
        f"format      {fmt}{weights}; {human_bytes(result.file_bytes)} on disk",
        highlight=False,
        markup=False,
        soft_wrap=True,
    )
    ckpt = result.checkpoint
    if ckpt:
        parts = [f"step {ckpt['step']}"]
        if ckpt["epoch"] is not None:
            parts.append(f"epoch {ckpt['epoch']}")
        parts.append(local_time(ckpt["time"]))
        if ckpt["metrics"]:
            parts.append(" ".join(f"{k}={number(v)}" for k, v in ckpt["metrics"].items()))
        if ckpt["pinned"]:
            parts.append("pinned")
        if ckpt["kind"] != "train":
            parts.append(f"kind {ckpt['kind']}")
        out.print(
            f"checkpoint  {ckpt['name']}: " + ", ".join(parts), highlight=False, markup=False, soft_wrap=True
        )
    if result.tensors:
        dtypes = ", ".join(f"{d.dtype} {format_count(d.numel)} ({d.tensors})" for d in result.by_dtype())
        out.print(
            f"tensors     {len(result.tensors)}, {format_count(result.numel)} elements, "
            f"{human_bytes(result.tensor_bytes)}: {dtypes}",
            highlight=False,
            markup=False,
            soft_wrap=True,
        )
        modules = result.by_module()
        if 1 < len(modules) <= 12:
            shown = ", ".join(f"{k} {format_count(v)}" for k, v in modules.items())
            out.print(f"by module   {shown}", highlight=False, markup=False, soft_wrap=True)
    if result.files:
        shown = ", ".join(f"{name} {human_bytes(size)}" for name, size in result.files.items())
        out.print(f"files       {shown}", highlight=False, markup=False, soft_wrap=True)
    if result.training_state:
        table = Table(title="training state", title_justify="left", header_style="bold")
        for column in ("entry", "kind", "what", "tensors", "size"):
            # Only the summary wraps to fit the width; nothing is cut with "…".
            table.add_column(
                column,
                justify="right" if column in ("tensors", "size") else "left",
                no_wrap=column != "what",
                overflow="fold",
            )
        for item in result.training_state:
            table.add_row(
                Text(item.name),
                item.kind.value,
                Text(item.summary),
                str(item.tensors) if item.tensors else "",
                human_bytes(item.nbytes) if item.nbytes else "",
            )
        print_table(out, table)
    if result.tensors:
        rows = result.tensors if limit is None else result.tensors[:limit]
        table = Table(title="tensors", title_justify="left", header_style="bold")
        table.add_column("name", overflow="fold")  # long names wrap, never cut
        table.add_column("shape", overflow="fold")
        table.add_column("dtype")
        table.add_column("elements", justify="right")
        table.add_column("size", justify="right")
        for t in rows:
            name = t.name if t.tied_to is None else f"{t.name} (tied to {t.tied_to})"
            table.add_row(Text(name), str(list(t.shape)), t.dtype, f"{t.numel:,}", human_bytes(t.nbytes))
        print_table(out, table)
        hidden = len(result.tensors) - len(rows)
        if hidden:
            out.print(
                f"... {hidden} more tensors (--all lists them, --filter narrows)",
                highlight=False,
                markup=False,
                soft_wrap=True,
            )
    for note in result.notes:
        out.print(f"note: {note}", highlight=False, markup=False, soft_wrap=True)
