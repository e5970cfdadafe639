"""Keeping a soup up to date as training goes: `RunningSoup(recipe, output)`.

Call `running.update(run)` after each committed checkpoint (the
CheckpointManager does when given `running_soup=`). It recomputes the soup only
when the recipe's selection (or a member's file) changed, writes `output`
atomically each time, and returns the new `SoupResult` (None when nothing
changed or nothing is selected yet). Errors are raised, not swallowed.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

from ladle.averaging.greedy import Evaluate, ModelLike
from ladle.averaging.int_policies import IntPolicy
from ladle.averaging.provenance import read_provenance
from ladle.averaging.recipe_parsing import parse_recipe
from ladle.averaging.recipes import Recipe, Top, Window
from ladle.averaging.selection import select
from ladle.averaging.soups import SoupResult, soup
from ladle.averaging.weights import WeightsLike, parse_weights
from ladle.errors import ConfigError, EmptySelection, OutputExists
from ladle.formats.write import output_exists, output_format, output_location
from ladle.store.run import Run

log = logging.getLogger("ladle")


class RunningSoup:
    """Keeps a soup file up to date as training goes: call `update(run)` after each commit.

    The soup is recomputed only when the recipe's selection changes (members
    or their files); the file is replaced atomically each time. An existing
    file is replaced only if it holds a soup of the same recipe (a resumed
    run) or `force=True`.
    """

    def __init__(
        self,
        recipe: str | Recipe,
        output: str | os.PathLike[str],
        *,
        window: str | Window | None = None,
        weights: WeightsLike = "uniform",
        key: str | None = None,
        dtype: str | torch.dtype | None = None,
        accumulate: str | torch.dtype = "float32",
        int_policy: IntPolicy | str = IntPolicy.NEWEST,
        evaluate: Evaluate | None = None,
        model: ModelLike | None = None,
        format: str | None = None,
        min_members: int = 1,
        force: bool = False,
    ) -> None:
        self.recipe = parse_recipe(recipe, window)
        self.output = output_location(output)
        output_format(self.output, format)
        if self.recipe.select.needs_evaluate and evaluate is None:
            raise ConfigError(f"running soup {self.recipe} needs evaluate=")
        if not isinstance(min_members, int) or min_members < 1:
            raise ConfigError(f"min_members={min_members!r} must be a whole number of at least 1")
        self.weights = parse_weights(weights)
        self.kwargs: dict[str, Any] = {
            "key": key,
            "dtype": dtype,
            "accumulate": accumulate,
            "int_policy": int_policy,
            "evaluate": evaluate,
            "model": model,
            "format": format,
        }
        self.min_members = min_members
        self.force = force
        self.last: SoupResult | None = None
        self._signature: tuple[Any, ...] | None = None
        self._checked_existing = False

    def _may_replace(self) -> None:
        if self._checked_existing or self.force or not output_exists(self.output):
            self._checked_existing = True
            return
        try:
            record = read_provenance(self.output)
        except Exception:  # an unreadable file is not ours to replace
            record = None
        if record is None or record.get("recipe") != str(self.recipe):
            raise OutputExists(
                f"{self.output}: exists and is not a running soup of {self.recipe}; "
                "pass force=True to replace it"
            )
        self._checked_existing = True

    def update(self, run: Run) -> SoupResult | None:
        """Recompute the soup if the selection changed; the new result, or None."""
        try:
            recipe, chosen = select(run, self.recipe, key=self.kwargs["key"])
        except EmptySelection:
            return None
        except ConfigError as exc:
            # top:K before the monitored metric is recorded: nothing to do yet.
            if isinstance(self.recipe.select, Top) and run.monitor is None:
                log.debug("running soup waits for a monitored metric: %s", exc)
                return None
            raise
        if len(chosen) < self.min_members:
            return None
        signature = (
            str(self.weights),
            *((c.name, tuple(sorted((n, f.sha256) for n, f in c.files.items()))) for c in chosen),
        )
        if signature == self._signature:
            return None
        self._may_replace()
        result = soup(run, recipe, output=self.output, weights=self.weights, force=True, **self.kwargs)
        self._signature = signature
        self.last = result
        log.info("running soup %s now averages %d checkpoints", recipe, len(result.members))
        return result


__all__ = ["RunningSoup"]
