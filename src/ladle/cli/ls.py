"""`ladle ls RUN`: a table of a run's checkpoints, marking latest, best and pinned."""

from __future__ import annotations

import os
from typing import Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from ladle.cli.app import app, console, fail, print_json
from ladle.cli.display import examples, human_bytes, local_time, number, print_table
from ladle.metrics import parse_mode
from ladle.store.run import META_NAME, CheckpointInfo, Run

EXAMPLE = examples(
    "ladle ls runs/exp1",
    "ladle ls runs/exp1 --best-by val_acc --mode max",
    "ladle ls runs/exp1 --json",
)


def checkpoint_rows(run: Run, *, best_by: str | None = None, mode: str | None = None) -> list[dict[str, Any]]:
    """One JSON-ready record per checkpoint, oldest first, with latest/best/pinned marks."""
    checkpoints = run.checkpoints()
    if best_by is not None:
        best = run.best(best_by, parse_mode(mode or "min", field="--mode"))
    else:
        best = run.best()
    latest = run.latest()
    return [_row(c, latest, best) for c in checkpoints]


def _row(info: CheckpointInfo, latest: CheckpointInfo | None, best: CheckpointInfo | None) -> dict:
    return {
        "name": info.name,
        "path": info.path,
        "step": info.step,
        "epoch": info.epoch,
        "time": info.time,
        "time_local": local_time(info.time),
        "metrics": info.metrics,
        "size": info.size,
        "files": sorted(info.files),
        "kind": info.kind,
        "latest": latest is not None and info.name == latest.name,
        "best": best is not None and info.name == best.name,
        "pinned": info.pinned,
        "ema": "ema.safetensors" in info.files,
    }


@app.command("ls", epilog=EXAMPLE)
def ls_command(
    run_path: Annotated[
        str, typer.Argument(metavar="RUN", help="A run directory (local path or fsspec URL).")
    ],
    best_by: Annotated[
        str | None,
        typer.Option("--best-by", help="Mark the best checkpoint by this metric instead of the run's."),
    ] = None,
    mode: Annotated[
        str | None, typer.Option("--mode", help="Direction of --best-by: min or max (default min).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """List a run's checkpoints: name, step, epoch, time, metrics, size.

    Marks the latest, the best (by the run's monitored metric, or --best-by) and
    pinned checkpoints, and those holding EMA weights.
    """
    if mode is not None and best_by is None:
        fail("--mode needs --best-by METRIC (the run's own monitor already has a direction)")
    local = run_path if "://" in run_path else os.path.abspath(run_path)
    if "://" not in run_path and os.path.isfile(os.path.join(local, META_NAME)):
        fail(
            f"{local}: is one checkpoint, not a run; list its run with `ladle ls {os.path.dirname(local)}` "
            f"or look inside with `ladle inspect {run_path}`"
        )
    run = Run(run_path)
    rows = checkpoint_rows(run, best_by=best_by, mode=mode)
    monitor = {"metric": best_by, "mode": mode or "min"} if best_by else run.monitor
    if as_json:
        print_json({"run": run.path, "monitor": monitor, "checkpoints": rows})
        return
    if not rows:
        console.print(f"{run.path}: no checkpoints yet", highlight=False, markup=False, soft_wrap=True)
        return
    print_table(console, _table(run.path, rows, monitor))


def _table(path: str, rows: list[dict[str, Any]], monitor: dict[str, str] | None) -> Table:
    metric_names: list[str] = []
    if monitor and monitor.get("metric"):
        metric_names.append(monitor["metric"])
    for row in rows:
        for name in row["metrics"]:
            if name not in metric_names:
                metric_names.append(name)
    title = f"{path}: {len(rows)} checkpoints, {human_bytes(sum(r['size'] for r in rows))}"
    if monitor:
        title += f"; best = {monitor['mode']} {monitor['metric']}"
    table = Table(title=title, title_justify="left", header_style="bold")
    # Names and times stay whole; rich narrows the metric columns instead.
    table.add_column("name", no_wrap=True, min_width=max(len(r["name"]) for r in rows))
    table.add_column("step", justify="right", no_wrap=True)
    table.add_column("epoch", justify="right")
    table.add_column("time", no_wrap=True, min_width=19)
    for name in metric_names:
        table.add_column(name, justify="right")
    table.add_column("size", justify="right", no_wrap=True)
    table.add_column("marks")
    for row in rows:
        marks = [m for m in ("latest", "best", "pinned") if row[m]]
        if row["ema"]:
            marks.append("ema")
        if row["kind"] != "train":
            marks.append(row["kind"])
        style = "bold" if row["best"] else None
        table.add_row(
            Text(row["name"]),
            str(row["step"]),
            "-" if row["epoch"] is None else str(row["epoch"]),
            row["time_local"],
            *[number(row["metrics"][m]) if m in row["metrics"] else "-" for m in metric_names],
            human_bytes(row["size"]),
            ", ".join(marks),
            style=style,
        )
    return table
