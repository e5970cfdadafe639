"""`ladle report RUN -o report.png`: learning curves with checkpoints, the best and soup members marked."""

from __future__ import annotations

import os
from typing import Annotated

import typer

from ladle.cli.app import app, console, print_json
from ladle.cli.display import examples

EXAMPLE = examples(
    "ladle report runs/exp1 -o report.png",
    "ladle report runs/exp1 --recipe last:5 --recipe top:5:val_loss:min",
    "ladle report runs/exp1 --recipe soup.safetensors --metric loss -o loss.svg",
)


@app.command("report", epilog=EXAMPLE)
def report_command(
    run: Annotated[str, typer.Argument(metavar="RUN", help="The run folder.", show_default=False)],
    output: Annotated[
        str,
        typer.Option(
            "-o", "--output", help="Image to write (path or URL): .png, .svg or .pdf (replaced if it exists)."
        ),
    ] = "report.png",
    recipes: Annotated[
        list[str] | None,
        typer.Option(
            "--recipe",
            help="Mark the members of a recipe (last:5, top:5:val_loss:min, improved:...) or of a soup "
            "file ladle wrote (its provenance lists them); repeat for several.",
        ),
    ] = None,
    metrics: Annotated[
        list[str] | None,
        typer.Option("--metric", "-m", help="Draw only this metric (val_loss) or panel (loss); repeatable."),
    ] = None,
    x: Annotated[
        str, typer.Option("--x", help="x axis: step, epoch (epochs completed) or time (wall time).")
    ] = "step",
    title: Annotated[str | None, typer.Option("--title", help="Title above the panels.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print what was drawn as JSON.")] = False,
) -> None:
    """Draw a run's learning curves, one panel per metric.

    The history comes from the run (every checkpoint stores it). Saved
    checkpoints are marked on the monitored curve, the best one with a star;
    a strip under the panels shows the members of each --recipe. Needs
    matplotlib (pip install 'ladle[plot]').
    """
    from ladle.tools.report import plot_run

    result = plot_run(run, output, recipes=recipes or (), metrics=metrics, x=x, title=title)
    if as_json:
        print_json(result.to_dict())
        return
    panels = f"{len(result.panels)} panel{'s' if len(result.panels) != 1 else ''}"
    console.print(
        f"wrote {_shown(result.path)} ({result.width}x{result.height} px): {panels} "
        f"({', '.join(result.panels)}), {len(result.checkpoints)} checkpoints"
        + (f", best {result.best}" if result.best else ""),
        highlight=False,
        markup=False,
    )
    for label, members in result.marked.items():
        console.print(
            f"  {label}: {len(members)} members ({', '.join(members)})", highlight=False, markup=False
        )


def _shown(path: str) -> str:
    """A path as the user would type it: relative when it is under the working directory; a URL as is."""
    if "://" in path:
        return path
    relative = os.path.relpath(path)
    return path if relative.startswith("..") else relative
