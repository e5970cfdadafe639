"""Learning curves of a run, with its checkpoints, the best one and a soup's members marked.

    ladle.tools.report.plot_run("runs/exp1", "report.png", recipes=["top:5:val_loss:min"])

The metrics come from the run itself: the manager appends every reported metric
to the run's `history.jsonl` (see `ladle.store.history`), which covers
the run; a run without one is drawn from the metrics in each `meta.json`.

One panel per metric: names that differ only by a split or variant token
(`train_loss`, `val_loss`, `val_ema_loss`) share a panel, with one colour per
variant in every panel. Values recorded per step are drawn thin, per epoch
bold. The saved checkpoints are marked on the monitored variant (`val` when
the run monitors `val_loss`), the best one with a star and a dotted line, and
a strip under the panels shows which checkpoints each recipe (or soup file)
takes.

The data drawn (history series, panels, x axis, recipe members) is gathered by
`ladle.tools.report_data`; this module draws it. matplotlib is an optional extra
(`pip install ladle[plot]`); it is imported only when a report is drawn, and drawn
without pyplot's global state.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ladle.errors import ConfigError, MissingDependency
from ladle.metrics import is_finite_number
from ladle.store.checkpoint import CheckpointInfo
from ladle.store.refs import open_run_to_read
from ladle.store.run import Run
from ladle.tools.report_data import (
    Marked,
    Point,
    XAxis,
    choose_metrics,
    load_history,
    recipe_members,
    series_of,
    split_name,
)

log = logging.getLogger("ladle")


@dataclass(kw_only=True)
class ReportResult:
    """What was drawn where."""

    path: str
    """The image written."""
    panels: list[str]
    """One per metric, top to bottom."""
    series: list[str]
    """Every metric drawn."""
    checkpoints: list[str]
    """The saved checkpoints marked."""
    best: str | None
    """The best checkpoint by the run's monitored metric."""
    marked: dict[str, list[str]] = field(default_factory=dict)
    """Each recipe's label and its members."""
    width: int = 0
    """Image width in pixels."""
    height: int = 0
    """Image height in pixels."""

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)


def _matplotlib() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise MissingDependency("drawing a report needs matplotlib: pip install 'ladle[plot]'") from None
    return matplotlib


_PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf"]
_PREFERRED = {"train": 0, "training": 0, "": 0, "val": 1, "valid": 1, "validation": 1, "eval": 1, "dev": 1}
_MEMBER_COLOR = "#3b3b3b"  # one neutral colour: rows are labelled, and curve colours keep their meaning


def _variant_colors(variants: Sequence[str]) -> dict[str, str]:
    colors: dict[str, str] = {}
    taken: set[int] = set()
    for v in variants:
        index = _PREFERRED.get(v)
        if index is not None and index not in taken:
            colors[v] = _PALETTE[index]
            taken.add(index)
    free = [i for i in range(len(_PALETTE)) if i not in taken]
    for v in variants:
        if v not in colors:
            index = free.pop(0) if free else len(colors) % len(_PALETTE)
            colors[v] = _PALETTE[index]
    return colors


def _variant_label(variant: str, metric: str) -> str:
    return variant.replace("_", " ") if variant else metric


def plot_run(
    run: Run | str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    recipes: Sequence[str] = (),
    metrics: Sequence[str] | None = None,
    x: str = "step",
    title: str | None = None,
    dpi: int = 110,
) -> ReportResult:
    """Draw the run's learning curves into `output` (PNG, SVG or PDF by its suffix); replaces it.

    `recipes`: recipe strings (`top:5:val_loss:min`) or soup files whose members
    are marked in the strip under the panels. `metrics`: draw only these
    metrics (names as recorded, or panel names like `loss`). `x`: "step",
    "epoch" (epochs completed) or "time" (wall time since the first record).
    """
    text = _output_path(output)
    the_run = run if isinstance(run, Run) else open_run_to_read(run)
    history = load_history(the_run)
    all_series = series_of(history)
    if not all_series:
        raise ConfigError(
            f"{the_run.path}: no metrics recorded yet; pass metrics= to manager.step()/epoch_end()"
        )
    chosen = choose_metrics(all_series, metrics)
    marked = [recipe_members(the_run, spec) for spec in recipes]
    axis = XAxis(x, history)
    checkpoints = the_run.checkpoints(kind="train")
    monitor = the_run.monitor
    best = the_run.best() if monitor else None
    panels = _panels(chosen, monitor)
    colors = _variant_colors(list(dict.fromkeys(split_name(n)[1] for n in chosen)))
    # Checkpoints are marked on the curves of the variant the run monitors ("val" for val_loss).
    marked_variant = split_name(monitor["metric"])[1] if monitor else None

    _matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    strip_rows = 1 + (1 if best else 0) + len(marked)
    panel_height, strip_height = 2.5, 0.42 * strip_rows + 0.5
    figure = Figure(
        figsize=(12, panel_height * len(panels) + strip_height + 0.9), dpi=dpi, layout="constrained"
    )
    FigureCanvasAgg(figure)
    grid = figure.add_gridspec(
        len(panels) + 1, 1, height_ratios=[panel_height] * len(panels) + [strip_height]
    )
    axes = [figure.add_subplot(grid[i, 0]) for i in range(len(panels))]
    strip = figure.add_subplot(grid[len(panels), 0], sharex=axes[0])
    for ax in axes[1:]:
        ax.sharex(axes[0])

    best_x = axis.of(best.step, best.time) if best else None
    for ax, (panel, names) in zip(axes, panels.items(), strict=True):
        handles: list[Any] = []
        marks: list[Any] = []
        for name in names:
            variant = split_name(name)[1]
            handles.extend(
                _draw_series(ax, axis, all_series[name], _variant_label(variant, name), colors[variant])
            )
            if variant == marked_variant or (marked_variant is None and name == names[-1]):
                marks.extend(_mark_checkpoints(ax, axis, checkpoints, name, best, colors[variant]))
        if best_x is not None:
            ax.axvline(best_x, color="#444444", linestyle=":", linewidth=1.0, zorder=1)
        ax.set_ylabel(panel)
        ax.grid(True, alpha=0.25)
        ax.legend(
            handles=handles + marks, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9, frameon=False
        )
        ax.tick_params(labelbottom=False)
        ax.margins(x=0.01)

    _draw_strip(strip, axis, checkpoints, best, monitor, marked, best_x)
    strip.set_xlabel(axis.label)
    if x == "step" and len(axis.epoch_steps) > 1:
        top = axes[0].secondary_xaxis(
            "top", functions=(_vectorized(axis.epochs_at), _vectorized(axis.step_at))
        )
        top.set_xlabel("epochs completed", fontsize=9)
    if title is None:
        title = f"{the_run.path}: {len(checkpoints)} checkpoints"
        if best and monitor:
            value = best.metrics.get(monitor["metric"])
            title += f"; best {best.name} ({monitor['metric']} {monitor['mode']} = {_short(value)})"
    figure.suptitle(title, fontsize=12, x=0.01, ha="left")
    _save(figure, text)
    width, height = figure.canvas.get_width_height()
    return ReportResult(
        path=text,
        panels=list(panels),
        series=list(chosen),
        checkpoints=[c.name for c in checkpoints],
        best=best.name if best else None,
        marked={m.label: [c.name for c in m.members] for m in marked},
        width=width,
        height=height,
    )


def _output_path(output: str | os.PathLike[str]) -> str:
    """The absolute output path (or URL), checked before any work: a known image suffix, an
    existing folder (a URL's is made on upload)."""
    from ladle.formats.write import output_location
    from ladle.store.storage import is_url

    text = output_location(output)
    if os.path.splitext(text)[1].lower() not in (".png", ".svg", ".pdf"):
        raise ConfigError(f"{text}: write the report as .png, .svg or .pdf")
    if not is_url(text) and not os.path.isdir(os.path.dirname(text)):
        raise ConfigError(f"{text}: the folder {os.path.dirname(text)} does not exist; create it first")
    return text


def _panels(chosen: Sequence[str], monitor: Mapping[str, str] | None) -> dict[str, list[str]]:
    """Metric names by panel: the monitored metric's panel first; train, then val, then the rest."""
    panels: dict[str, list[str]] = {}
    for name in chosen:
        panels.setdefault(split_name(name)[0], []).append(name)
    if monitor:
        first = split_name(monitor["metric"])[0]
        if first in panels:
            panels = {first: panels[first], **{k: v for k, v in panels.items() if k != first}}
    variants = list(dict.fromkeys(split_name(n)[1] for n in chosen))
    rank = {v: (_PREFERRED.get(v, 9), variants.index(v)) for v in variants}
    return {p: sorted(names, key=lambda n: rank[split_name(n)[1]]) for p, names in panels.items()}


def _draw_series(ax: Any, axis: XAxis, points: Sequence[Point], label: str, color: str) -> list[Any]:
    """One metric's curves: per-step values thin (faint when per-epoch values exist too), per-epoch bold."""
    steps = [p for p in points if p.per_step]
    epochs = [p for p in points if not p.per_step]
    handles = []
    if steps:
        (line,) = ax.plot(
            [axis.of(p.step, p.time) for p in steps],
            [p.value for p in steps],
            color=color,
            linewidth=0.7,
            alpha=0.3 if epochs else 0.8,
            label=f"{label} (per step)",
        )
        handles.append(line)
    if epochs:
        (line,) = ax.plot(
            [axis.of(p.step, p.time) for p in epochs],
            [p.value for p in epochs],
            color=color,
            linewidth=1.8,
            label=label if not steps else f"{label} (per epoch)",
        )
        handles.append(line)
    return handles


def _mark_checkpoints(
    ax: Any,
    axis: XAxis,
    checkpoints: Sequence[CheckpointInfo],
    metric: str,
    best: CheckpointInfo | None,
    color: str,
) -> list[Any]:
    saved = [c for c in checkpoints if is_finite_number(c.metrics.get(metric))]
    handles = []
    if saved:
        handles.append(
            ax.scatter(
                [axis.of(c.step, c.time) for c in saved],
                [float(c.metrics[metric]) for c in saved],
                s=22,
                facecolors="white",
                edgecolors=color,
                linewidths=1.1,
                zorder=3,
                label="saved checkpoint",
            )
        )
    if best is not None and is_finite_number(best.metrics.get(metric)):
        handles.append(
            ax.scatter(
                [axis.of(best.step, best.time)],
                [float(best.metrics[metric])],
                s=170,
                marker="*",
                facecolors="#ffd700",
                edgecolors="black",
                linewidths=0.8,
                zorder=4,
                label=f"best ({best.name})",
            )
        )
    return handles


def _draw_strip(
    ax: Any,
    axis: XAxis,
    checkpoints: Sequence[CheckpointInfo],
    best: CheckpointInfo | None,
    monitor: Mapping[str, str] | None,
    marked: Sequence[Marked],
    best_x: float | None,
) -> None:
    """Rows of markers under the panels: saved checkpoints, the best, each recipe's members."""
    rows: list[str] = []
    y = 0
    ax.scatter(
        [axis.of(c.step, c.time) for c in checkpoints],
        [y] * len(checkpoints),
        marker="|",
        s=90,
        color="#555555",
        linewidths=1.2,
    )
    rows.append(f"saved checkpoints ({len(checkpoints)})")
    if best is not None and monitor:
        y += 1
        ax.scatter(
            [axis.of(best.step, best.time)],
            [y],
            marker="*",
            s=170,
            facecolors="#ffd700",
            edgecolors="black",
            linewidths=0.8,
            zorder=3,
        )
        rows.append(f"best by {monitor['metric']} ({monitor['mode']})")
    for mark in marked:
        y += 1
        ax.scatter(
            [axis.of(c.step, c.time) for c in mark.members],
            [y] * len(mark.members),
            s=36,
            color=_MEMBER_COLOR,
            zorder=3,
        )
        rows.append(_wrap(f"{mark.label} ({len(mark.members)})"))
    if best_x is not None:
        ax.axvline(best_x, color="#444444", linestyle=":", linewidth=1.0, zorder=1)
    ax.set_yticks(range(len(rows)), rows, fontsize=9)
    ax.yaxis.tick_right()
    ax.set_ylim(len(rows) - 0.5, -0.5)
    ax.grid(True, axis="x", alpha=0.25)
    for side in ("top", "left"):
        ax.spines[side].set_visible(False)
    ax.tick_params(axis="y", length=0)


def _wrap(label: str, width: int = 36) -> str:
    """Long recipe strings on several lines, broken after commas (they have no spaces)."""
    lines, current = [], ""
    for piece in re.split(r"(?<=,)", label):
        if current and len(current) + len(piece) > width:
            lines.append(current)
            current = ""
        current += piece
    lines.append(current)
    return "\n".join(lines)


def _vectorized(func: Any) -> Any:
    import numpy as np

    return lambda values: np.vectorize(func, otypes=[float])(values)


def _short(value: Any) -> str:
    if isinstance(value, float) and math.isfinite(value):
        return f"{value:.4g}"
    return str(value)


def _save(figure: Any, path: str) -> None:
    """Write the image atomically, so a reader never sees half a file."""
    from ladle.formats import atomic_path

    suffix = os.path.splitext(path)[1].lstrip(".").lower()
    with atomic_path(path, force=True) as tmp:
        figure.savefig(tmp, format=suffix)
