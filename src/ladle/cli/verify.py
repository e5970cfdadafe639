"""`ladle verify RUN|CKPT`: recompute checksums and load every file; exit 1 if anything is bad."""

from __future__ import annotations

from typing import Annotated

import typer

from ladle.cli.app import app, console, err_console, print_json
from ladle.cli.display import examples, human_bytes
from ladle.store.verification import Verification

EXAMPLE = examples(
    "ladle verify runs/exp1",
    "ladle verify runs/exp1/step-000001000",
    "ladle verify runs/exp1 --quick --json",
    footer="Exit status: 0 all good, 1 something failed, 2 bad input.",
)


@app.command("verify", epilog=EXAMPLE)
def verify_command(
    path: Annotated[
        str,
        typer.Argument(
            metavar="RUN|CKPT", help="A run, one checkpoint folder, or a reference (RUN/best, RUN@1200)."
        ),
    ],
    quick: Annotated[
        bool,
        typer.Option("--quick", help="Only sizes and checksums; skip loading each file."),
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """Check every checkpoint file against its recorded checksum.

    Names each bad file (missing, truncated, changed, unreadable) and each folder
    that looks like a checkpoint but is not one (no or unreadable meta.json).
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from ladle.store.refs import resolve_checkpoint
    from ladle.store.verification import verify_path

    path = resolve_checkpoint(path)  # RUN/best, RUN@1200, ... (ladle.store.refs)

    show_progress = not as_json and err_console.is_terminal
    with Progress(
        TextColumn("verifying"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[name]}"),
        console=err_console,
        transient=True,
        disable=not show_progress,
    ) as bar:
        # Shown from the first checkpoint on, when the total is known (never "0/None").
        task = bar.add_task("verify", total=None, name="", visible=False)

        def progress(name: str, done: int, total: int) -> None:
            bar.update(task, name=name, completed=done, total=total, visible=True)

        result = verify_path(path, load=not quick, progress=progress)
    if as_json:
        print_json(result.to_dict())
    else:
        _show(result)
    raise typer.Exit(0 if result.ok else 1)


def _show(result: Verification) -> None:
    for check in result.checkpoints:
        status = "ok " if check.ok else "BAD"
        style = None if check.ok else "bold red"
        console.print(
            f"{status} {check.name}: {check.files} files, {human_bytes(check.nbytes)}",
            style=style,
            markup=False,
            soft_wrap=True,
            highlight=False,
        )
        for problem in check.problems:
            console.print(f"    {problem}", markup=False, soft_wrap=True, highlight=False)
        for note in check.notes:
            console.print(f"    note: {note}", markup=False, soft_wrap=True, highlight=False)
    bad = sum(not c.ok for c in result.checkpoints)
    total = len(result.checkpoints)
    if not total:
        console.print(
            f"{result.path}: no checkpoints to verify", markup=False, soft_wrap=True, highlight=False
        )
    elif bad:
        console.print(
            f"{bad} of {total} checkpoints failed verification", style="bold", markup=False, soft_wrap=True
        )
    else:
        noun = "checkpoint" if total == 1 else "checkpoints"
        console.print(f"all {total} {noun} verified", markup=False, soft_wrap=True, highlight=False)
