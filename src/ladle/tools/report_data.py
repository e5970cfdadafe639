"""What a run's report draws, gathered without matplotlib: the metrics history as series,
metric names split into panels and variants, the x axis (step, epoch or wall time, and
the map between steps and epochs), and the checkpoints each recipe or soup file takes.

The drawing itself is `ladle.tools.report`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ladle.errors import ConfigError
from ladle.metrics import is_finite_number
from ladle.store.checkpoint import CheckpointInfo
from ladle.store.history import read_history
from ladle.store.run import Run

X_AXES = ("step", "epoch", "time")
_VARIANT_TOKENS = ("train", "training", "val", "valid", "validation", "eval", "dev", "test", "ema")
_SEPARATORS = re.compile(r"[_/.\-]")


@dataclass(kw_only=True, frozen=True)
class Point:
    """One recorded value."""

    step: int
    epoch: int | None
    time: float
    value: float
    per_step: bool
    """Recorded by `manager.step()` (True) or at an epoch end / save (False)."""


def load_history(run: Run) -> list[dict[str, Any]]:
    """The run's metrics history, oldest first, from the run's `history.jsonl`.

    Without one (runs written by other tools), each checkpoint's recorded
    metrics stand in, as epoch-level records.
    """
    records = [r for r in read_history(run) if isinstance(r.get("metrics"), dict)]
    if records:
        return records
    return [
        {"kind": "epoch", "step": c.step, "epoch": c.epoch, "time": c.time, "metrics": dict(c.metrics)}
        for c in run.checkpoints(kind="train")
    ]


def series_of(history: Sequence[Mapping[str, Any]]) -> dict[str, list[Point]]:
    """Every finite numeric value of every metric, by metric name, in step order."""
    found: dict[str, list[Point]] = {}
    for record in history:
        per_step = record.get("kind") == "step"
        for name, value in record["metrics"].items():
            if not is_finite_number(value):
                continue
            found.setdefault(str(name), []).append(
                Point(
                    step=int(record.get("step") or 0),
                    epoch=record.get("epoch"),
                    time=float(record.get("time") or 0.0),
                    value=float(value),
                    per_step=per_step,
                )
            )
    for points in found.values():
        points.sort(key=lambda p: (p.step, p.time))
    return found


def split_name(metric: str) -> tuple[str, str]:
    """(panel, variant): `val_ema_nll` -> ("nll", "val_ema"); `loss` -> ("loss", "")."""
    tokens = [t for t in _SEPARATORS.split(metric) if t]
    variant = [t for t in tokens if t.lower() in _VARIANT_TOKENS]
    rest = [t for t in tokens if t.lower() not in _VARIANT_TOKENS]
    if not rest:  # a metric named only "val" or "train": keep it whole
        return metric, ""
    return "_".join(rest), "_".join(variant)


@dataclass(kw_only=True, frozen=True)
class Marked:
    """A recipe (or soup file) and the checkpoints it takes."""

    label: str
    members: list[CheckpointInfo]


def recipe_members(run: Run, spec: str) -> Marked:
    """The members of a recipe string, or of a soup file (read from its provenance)."""
    if os.path.isfile(spec):
        return _soup_file_members(run, spec)
    from ladle.averaging.recipe_parsing import parse_recipe
    from ladle.averaging.selection import select

    recipe = parse_recipe(spec)
    if recipe.select.needs_evaluate:
        raise ConfigError(
            f"recipe {recipe} needs an evaluation to choose its members; pass the soup file it wrote "
            "instead (its provenance lists the members)"
        )
    parsed, chosen = select(run, recipe)
    return Marked(label=str(parsed), members=chosen)


def _soup_file_members(run: Run, path: str) -> Marked:
    from ladle.averaging.provenance import read_provenance

    try:
        record = read_provenance(path)
    except Exception as exc:  # not a safetensors file, unreadable header...
        raise ConfigError(
            f"{path}: cannot read its provenance ({exc}); pass a recipe or a soup file"
        ) from None
    if not record or not isinstance(record.get("members"), list):
        raise ConfigError(f"{path}: holds no soup provenance; pass a recipe or a soup file written by ladle")
    names = [m.get("name") for m in record["members"]]
    known = {c.name: c for c in run.checkpoints()}
    # A member is this run's checkpoint when the name exists here and, where the soup
    # recorded a checksum, one of the checkpoint's files has it (another run reuses names).
    missing = [
        str(m.get("name"))
        for m in record["members"]
        if m.get("name") not in known
        or (m.get("sha256") and m["sha256"] not in {f.sha256 for f in known[m["name"]].files.values()})
    ]
    if missing:
        raise ConfigError(
            f"{path}: its members {', '.join(missing[:4])} are not checkpoints of {run.path}; "
            "pass the soup's own run"
        )
    recipe = str(record.get("recipe") or os.path.basename(path))
    return Marked(label=recipe, members=[known[str(n)] for n in names])


class XAxis:
    """Maps a step (or a time) to the chosen x coordinate."""

    def __init__(self, kind: str, history: Sequence[Mapping[str, Any]]) -> None:
        if kind not in X_AXES:
            raise ConfigError(f"x={kind!r} is not known; use one of {', '.join(X_AXES)}")
        self.kind = kind
        # Epoch e ends at the step of its epoch-level record: x = e + 1 epochs completed there.
        ends: dict[int, int] = {}
        for record in history:
            if record.get("kind") != "step" and record.get("epoch") is not None:
                ends[int(record["epoch"])] = max(ends.get(int(record["epoch"]), 0), int(record["step"]))
        points = [(0, 0.0)]
        for epoch, step in sorted(ends.items()):
            # Only strictly increasing points: the map must be invertible.
            if step > points[-1][0] and epoch + 1.0 > points[-1][1]:
                points.append((step, epoch + 1.0))
        self.epoch_steps = points
        times = [float(r["time"]) for r in history if r.get("time")]
        self.t0 = min(times) if times else 0.0
        span = (max(times) - self.t0) if times else 0.0
        self.time_unit, self.time_scale = (
            ("seconds", 1.0) if span < 180 else ("minutes", 60.0) if span < 3 * 3600 else ("hours", 3600.0)
        )
        if kind == "epoch" and len(self.epoch_steps) < 2:
            raise ConfigError("the run records no epoch ends; draw it with --x step or --x time")

    @property
    def label(self) -> str:
        if self.kind == "epoch":
            return "epochs completed"
        if self.kind == "time":
            return f"wall time ({self.time_unit})"
        return "step"

    def epochs_at(self, step: float) -> float:
        """Epochs completed at `step`, interpolated between epoch ends."""
        steps, epochs = zip(*self.epoch_steps, strict=True)
        return _piecewise(steps, epochs, step)

    def step_at(self, epoch: float) -> float:
        """The inverse of `epochs_at`."""
        steps, epochs = zip(*self.epoch_steps, strict=True)
        return _piecewise(epochs, steps, epoch)

    def of(self, step: int, when: float) -> float:
        if self.kind == "epoch":
            return self.epochs_at(step)
        if self.kind == "time":
            return (when - self.t0) / self.time_scale
        return float(step)


def choose_metrics(all_series: Mapping[str, list[Point]], metrics: Sequence[str] | None) -> list[str]:
    names = list(all_series)
    if not metrics:
        return names
    chosen: list[str] = []
    unknown = []
    for wanted in metrics:
        matches = [n for n in names if n == wanted or split_name(n)[0] == wanted]
        if not matches:
            unknown.append(wanted)
        chosen.extend(m for m in matches if m not in chosen)
    if unknown:
        raise ConfigError(
            f"no recorded metric {', '.join(map(repr, unknown))}; the run records {', '.join(names)}"
        )
    return chosen


def _piecewise(xs: Sequence[float], ys: Sequence[float], x: float) -> float:
    """Linear interpolation through (xs, ys), extended linearly past both ends.

    Extending (instead of clamping, as `numpy.interp` does) keeps the map
    invertible over the whole axis, which a secondary axis needs to line up.
    """
    import numpy as np

    if len(xs) < 2:
        return float(x)
    if x < xs[0]:
        return float(ys[0] + (x - xs[0]) * (ys[1] - ys[0]) / (xs[1] - xs[0]))
    if x > xs[-1]:
        return float(ys[-1] + (x - xs[-1]) * (ys[-1] - ys[-2]) / (xs[-1] - xs[-2]))
    return float(np.interp(x, xs, ys))
