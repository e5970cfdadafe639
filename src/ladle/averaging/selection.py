"""Which checkpoints a soup averages: a recipe applied to a run's records, reading no weights.

`select(run, recipe)` opens the run (a ladle run, or another tool's output
folder read as one), fills in the run's monitored metric for `top:K`, and
returns the checkpoints the recipe picks; `weights_for` weighs them from their
records. `ladle soup --dry-run`, `ladle report` and the integrations use these
without averaging anything.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ladle.averaging.recipe_parsing import parse_recipe
from ladle.averaging.recipes import Recipe, Top, Window
from ladle.averaging.weights import Weighting, WeightsLike, parse_weights
from ladle.errors import EmptySelection
from ladle.formats.load import ladle_weights_file
from ladle.store.checkpoint import CheckpointInfo
from ladle.store.foreign_runs import ForeignRun, foreign_tool
from ladle.store.refs import is_run_dir, open_run_to_read
from ladle.store.run import Run

log = logging.getLogger("ladle")


RunLike = Run | ForeignRun
"""What soups choose from: a ladle run, or a Trainer, Lightning or timm output folder read as one."""


def open_run(run: Run | ForeignRun | str | os.PathLike[str]) -> RunLike:
    if isinstance(run, Run | ForeignRun):
        return run
    text = os.fspath(run)
    if not is_run_dir(text) and (tool := foreign_tool(text)) is not None:
        return ForeignRun(text, tool)
    return open_run_to_read(run)


def candidates(run: RunLike, key: str | None) -> list[CheckpointInfo]:
    """The run's training checkpoints that hold the weights file `key` asks for."""
    history = run.checkpoints(kind="train")
    if isinstance(run, ForeignRun):
        return history  # every listed checkpoint of another tool holds model weights
    # `<key>.safetensors`; for the model, also transformers' names (a recorded Trainer folder's shards).
    usable = [c for c in history if ladle_weights_file(c.files, key) is not None]
    if len(usable) < len(history):
        log.warning(
            "%s: %d of %d checkpoints have no %s; leaving them out",
            run.path,
            len(history) - len(usable),
            len(history),
            f"{key or 'model'}.safetensors",
        )
    return usable


def select(
    run: RunLike | str | os.PathLike[str],
    recipe: str | Recipe,
    *,
    window: str | Window | None = None,
    key: str | None = None,
) -> tuple[Recipe, list[CheckpointInfo]]:
    """The recipe (monitor filled in) and the checkpoints it picks, reading no weights."""
    the_run = open_run(run)
    parsed = parse_recipe(recipe, window)
    if isinstance(parsed.select, Top):
        parsed = Recipe(select=parsed.select.resolved(the_run.monitor), window=parsed.window)
    history = candidates(the_run, key)
    chosen = parsed.choose(history)
    if not chosen:
        raise EmptySelection(
            f"{the_run.path}: recipe {parsed} selects none of the {len(history)} checkpoints; "
            "widen the window or change the recipe"
        )
    return parsed, chosen


@dataclass(frozen=True)
class _Weighed:
    label: str
    step: int | None
    metrics: dict[str, Any]


def weights_for(chosen: Sequence[CheckpointInfo], weights: WeightsLike) -> tuple[Weighting, list[float]]:
    """The weighting and normalized weights of chosen checkpoints, reading no tensors."""
    weighting = parse_weights(weights)
    return weighting, weighting([_Weighed(c.path, c.step, c.metrics) for c in chosen])


__all__ = ["RunLike", "candidates", "open_run", "select", "weights_for"]
