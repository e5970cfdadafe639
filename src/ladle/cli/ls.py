"""`ladle ls RUN`: a table of a run's checkpoints that fits the terminal, best and latest marked.

Name, step, the monitored metric and the marks are always shown; the epoch, the
other metrics, the size and the time follow while they fit the width (`--metrics`
chooses the metrics; `--json` has everything).
"""

from __future__ import annotations

import os
import textwrap
from typing import Annotated, Any

import typer

from ladle.cli.app import app, fail, print_json, say
from ladle.cli.display import box_table, examples, human_bytes, local_time, number, output_width
from ladle.errors import ConfigError
from ladle.metrics import parse_mode
from ladle.store.checkpoint import CheckpointInfo
from ladle.store.layout import META_NAME
from ladle.store.refs import has_run_files, open_run_to_read
from ladle.store.run import Run
from ladle.store.storage import is_url, storage_for

EXAMPLE = examples(
    "ladle ls runs/exp1",
    "ladle ls runs/exp1 --metrics val_loss,val_acc",
    "ladle ls runs/exp1 --best-by val_acc --mode max",
    "ladle ls runs/exp1 --json",
)
# rich's default box: one border column per column plus one, and one space each side.
_COLUMN_OVERHEAD = 3


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
        # A sharded checkpoint keeps its EMA in its DCP folder (meta.json records it was saved).
        "ema": "ema.safetensors" in info.files
        or (".metadata" in info.files and info.extra.get("ema") is True),
    }


def open_run(path: str) -> Run:
    """The run at `path`, or a one-line refusal saying what `path` is instead.

    Output folders of other tools (transformers Trainer, Lightning, timm) are
    recognised in `not_a_run_message`; listing them is `ladle.store.foreign_runs`'s job.
    """
    storage, folder = storage_for(path)
    if storage.isfile(storage.join(folder, META_NAME)):
        parent = folder.rstrip("/").rsplit("/", 1)[0] if is_url(folder) else os.path.dirname(folder)
        fail(
            f"{folder}: is one checkpoint, not a run; list its run with "
            f"`ladle ls {parent}` or look inside with `ladle inspect {path}`"
        )
    return open_run_to_read(path)


@app.command("ls", epilog=EXAMPLE)
def ls_command(
    run_path: Annotated[
        str, typer.Argument(metavar="RUN", help="A run directory (local path or fsspec URL).")
    ],
    best_by: Annotated[
        str | None,
        typer.Option(
            "--best-by", metavar="METRIC", help="Mark the best checkpoint by this metric, not the run's."
        ),
    ] = None,
    mode: Annotated[
        str | None,
        typer.Option("--mode", metavar="min|max", help="Direction of --best-by (default min)."),
    ] = None,
    metrics: Annotated[
        str | None,
        typer.Option(
            "--metrics",
            metavar="M1,M2|all|none",
            help="Metric columns besides the monitored one (default: those that fit the width).",
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts (every field).")] = False,
) -> None:
    """List a run's checkpoints: name, step, metrics, marks.

    Marks the latest training checkpoint, the best (by the run's monitored
    metric, or --best-by), pinned ones, those holding EMA weights, and soups.
    Columns that do not fit the terminal are left out (--metrics, --json).
    """
    if mode is not None and best_by is None:
        fail("--mode needs --best-by METRIC (the run's own monitor already has a direction)")
    if _list_foreign(run_path, best_by, mode, metrics, as_json):
        return
    run = open_run(run_path)
    if best_by is not None:
        _check_metric(run, best_by)
    try:
        rows = checkpoint_rows(run, best_by=best_by, mode=mode)
    except ConfigError as exc:
        fail(str(exc))
    monitor = {"metric": best_by, "mode": mode or "min"} if best_by else run.monitor
    if as_json:
        print_json({"run": run.path, "monitor": monitor, "checkpoints": rows})
        return
    if not rows:
        say(f"{run.path}: no checkpoints yet")
        return
    table, note = render(run.path, rows, monitor, width=output_width(), metrics=metrics)
    say(table)
    if note:
        say(note)


def _list_foreign(
    path: str, best_by: str | None, mode: str | None, metrics: str | None, as_json: bool
) -> bool:
    """List a Trainer, Lightning or timm output folder (metrics from the tool's own records);
    False when `path` is not one."""
    from ladle.store.checkpoint import best_of
    from ladle.store.foreign_runs import ForeignRun, foreign_tool

    _, where = storage_for(path)
    if has_run_files(where) or foreign_tool(where) is None:
        return False
    run = ForeignRun(where)
    checkpoints = run.checkpoints()
    monitor = {"metric": best_by, "mode": mode or "min"} if best_by else run.monitor
    best = None
    if monitor:
        best = best_of(checkpoints, monitor["metric"], parse_mode(monitor["mode"], field="--mode"))
    rows = [{**_row(c, checkpoints[-1], best), "tool": run.tool} for c in checkpoints]
    if as_json:
        print_json({"run": run.path, "tool": run.tool, "monitor": monitor, "checkpoints": rows})
        return True
    table, note = render(run.path, rows, monitor, width=output_width(), metrics=metrics)
    say(table)
    say(f"{run.path}: a {run.tool} output folder (read-only to ladle; no checksums recorded)")
    if note:
        say(note)
    return True


def _check_metric(run: Run, metric: str) -> None:
    known = sorted({m for c in run.checkpoints() for m in c.metrics})
    if metric not in known:
        shown = ", ".join(known) if known else "none recorded"
        fail(f"--best-by {metric}: no checkpoint of {run.path} records it; metrics: {shown}")


def render(
    path: str,
    rows: list[dict[str, Any]],
    monitor: dict[str, str] | None,
    *,
    width: int,
    metrics: str | None = None,
) -> tuple[Any, str | None]:
    """The titled table for `rows` within `width` columns (text), and a note naming what was left out."""
    watched = monitor["metric"] if monitor and monitor.get("metric") else None
    others = _metric_names(rows, watched)
    # Metrics named with --metrics (or all of them) are shown even when the table gets wider.
    if metrics is None or metrics == "all":
        wanted, fit = others, metrics is None
    elif metrics == "none":
        wanted, fit = [], True
    else:
        wanted = [m.strip() for m in metrics.split(",") if m.strip()]
        unknown = [m for m in wanted if m not in others and m != watched]
        if unknown:
            fail(f"--metrics {','.join(unknown)}: not recorded; metrics: {', '.join(others) or 'none'}")
        wanted, fit = [m for m in wanted if m != watched], False

    def cells(key: str) -> list[str]:
        if key == "epoch":
            return ["-" if r["epoch"] is None else str(r["epoch"]) for r in rows]
        if key == "size":
            return [human_bytes(r["size"]) for r in rows]
        if key == "time":
            return [r["time_local"] for r in rows]
        return [number(r["metrics"][key]) if key in r["metrics"] else "-" for r in rows]

    marks = [_marks(r) for r in rows]
    columns: dict[str, list[str]] = {"name": [r["name"] for r in rows]}
    columns["step"] = [str(r["step"]) for r in rows]
    if watched:
        columns[watched] = cells(watched)
    columns["marks"] = marks
    optional = ["epoch", *wanted, "size", "time"]
    left_out: list[str] = []
    used = sum(_width(k, v) for k, v in columns.items()) + 1
    for key in optional:
        values = cells(key)
        required = key in wanted and not fit
        if not required and used + _width(key, values) > width:
            left_out.append(key)
            continue
        columns[key] = values
        used += _width(key, values)
    order = ["name", "step", "epoch", *([watched] if watched else []), *wanted, "size", "time", "marks"]
    title = f"{path}: {len(rows)} checkpoints, {human_bytes(sum(r['size'] for r in rows))}"
    if monitor:
        title += f"; best = {monitor['mode']} {monitor['metric']}"
    shown = [k for k in order if k in columns]
    cells_by_row = [[columns[k][i] for k in shown] for i in range(len(rows))]
    table = box_table(shown, cells_by_row, left={"name", "time", "marks"})
    hidden_metrics = [k for k in left_out if k not in ("epoch", "size", "time")]
    note = None
    if hidden_metrics:
        note = textwrap.fill(
            f"not shown for lack of width: {', '.join(hidden_metrics)} (--metrics picks the "
            "metric columns, --json has everything)",
            width=max(width, 40),
        )
    title = textwrap.fill(title, width=max(width, 40), break_long_words=False, break_on_hyphens=False)
    return f"{title}\n{table}", note


def _metric_names(rows: list[dict[str, Any]], watched: str | None) -> list[str]:
    names: list[str] = []
    for row in rows:
        for name in row["metrics"]:
            if name != watched and name not in names:
                names.append(name)
    return names


def _marks(row: dict[str, Any]) -> str:
    marks = [m for m in ("latest", "best", "pinned") if row[m]]
    if row["ema"]:
        marks.append("ema")
    if row["kind"] != "train":
        marks.append(row["kind"])
    return ", ".join(marks)


def _width(header: str, values: list[str]) -> int:
    return max([len(header), *(len(v) for v in values)]) + _COLUMN_OVERHEAD
