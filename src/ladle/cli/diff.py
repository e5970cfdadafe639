"""`ladle diff A B`: how two checkpoints' tensors differ; exits 0 identical, 1 different."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table
from rich.text import Text

from ladle.cli.app import app, console, fail, print_json
from ladle.cli.display import examples, print_table, scientific
from ladle.tools.diff import Diff, DiffSort, TensorChange, diff_checkpoints

EXAMPLE = examples(
    "ladle diff runs/exp1/step-000001000 runs/exp1/step-000002000",
    "ladle diff CKPT CKPT --key-a model --key-b ema",
    "ladle diff model.pt model.safetensors --strip-prefix auto --json",
    footer="Exit status: 0 identical, 1 different, 2 bad input (like diff).",
)
DEFAULT_TOP = 20


@app.command("diff", epilog=EXAMPLE)
def diff_command(
    a: Annotated[str, typer.Argument(metavar="A", help="The first checkpoint (any format).")],
    b: Annotated[str, typer.Argument(metavar="B", help="The second checkpoint.")],
    key: Annotated[
        str | None, typer.Option("--key", help="Weights to compare on both sides (e.g. ema).")
    ] = None,
    key_a: Annotated[str | None, typer.Option("--key-a", help="Weights of A (overrides --key).")] = None,
    key_b: Annotated[str | None, typer.Option("--key-b", help="Weights of B (overrides --key).")] = None,
    strip_prefix: Annotated[
        list[str] | None,
        typer.Option(
            "--strip-prefix", help="Remove this key prefix on both sides ('auto': module., _orig_mod.)."
        ),
    ] = None,
    atol: Annotated[
        float,
        typer.Option(
            "--atol", help="Count tensors whose largest difference is <= this as equal (default: bitwise)."
        ),
    ] = 0.0,
    sort: Annotated[
        DiffSort, typer.Option("--sort", help="Order of changed tensors, largest first.")
    ] = DiffSort.RELATIVE,
    top: Annotated[
        int, typer.Option("--top", help=f"Changed tensors to list (default {DEFAULT_TOP}; 0 = all).")
    ] = DEFAULT_TOP,
    trust: Annotated[
        bool,
        typer.Option(
            "--trust", help="Allow full unpickling (runs code from the files; only for files you trust)."
        ),
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """Compare two checkpoints tensor by tensor.

    Lists keys only in A or only in B, shape and dtype changes, and for changed
    tensors the L2 distance ||B-A||, the relative change ||B-A||/||A|| and the
    largest absolute difference, largest change first, then a summary line.
    """
    if atol < 0:
        fail(f"--atol {atol} is negative; use 0 (bitwise) or a positive tolerance")
    if top < 0:
        fail(f"--top {top} is negative; use 0 to list every changed tensor")
    result = diff_checkpoints(
        a,
        b,
        key_a=key_a if key_a is not None else key,
        key_b=key_b if key_b is not None else key,
        strip_prefix=tuple(strip_prefix or ()),
        trust=trust,
        atol=atol,
        sort=sort,
    )
    if as_json:
        print_json(result.to_dict())
    else:
        _show(result, top)
    raise typer.Exit(0 if result.same else 1)


def _show(result: Diff, top: int) -> None:
    out = console
    out.print(f"A: {result.a}", markup=False, soft_wrap=True, highlight=False)
    out.print(f"B: {result.b}", markup=False, soft_wrap=True, highlight=False)
    for label, keys in (("only in A", result.only_a), ("only in B", result.only_b)):
        if keys:
            shown = ", ".join(keys[:10]) + (f", ... ({len(keys) - 10} more)" if len(keys) > 10 else "")
            out.print(f"{label} ({len(keys)}): {shown}", markup=False, soft_wrap=True, highlight=False)
    for change in result.shape_changes:
        out.print(
            f"shape changed: {change.name} {list(change.shape_a)} -> {list(change.shape_b)}",
            markup=False,
            soft_wrap=True,
            highlight=False,
        )
    for change in result.dtype_changes:
        out.print(
            f"dtype changed: {change.name} {change.dtype_a} -> {change.dtype_b} "
            f"(relative change {scientific(change.relative)})",
            markup=False,
            soft_wrap=True,
            highlight=False,
        )
    if result.value_changes:
        rows = result.value_changes if top == 0 else result.value_changes[:top]
        print_table(out, _table(rows, len(result.value_changes)))
        hidden = len(result.value_changes) - len(rows)
        if hidden:
            out.print(
                f"... {hidden} more changed tensors (--top 0 lists all)",
                markup=False,
                soft_wrap=True,
                highlight=False,
            )
    out.print(
        result.summary(),
        style="bold" if not result.same else None,
        markup=False,
        soft_wrap=True,
        highlight=False,
    )


def _table(rows: list[TensorChange], total: int) -> Table:
    table = Table(title=f"changed tensors ({total})", title_justify="left", header_style="bold")
    table.add_column("name")
    table.add_column("shape")
    table.add_column("dtype")
    table.add_column("L2 ||B-A||", justify="right")
    table.add_column("relative", justify="right")
    table.add_column("max |B-A|", justify="right")
    for c in rows:
        table.add_row(
            Text(c.name),
            str(list(c.shape_a)),
            c.dtype_a,
            scientific(c.l2),
            scientific(c.relative),
            scientific(c.max_abs),
        )
    return table
