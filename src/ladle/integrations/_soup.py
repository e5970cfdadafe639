"""The end-of-training soup both integration callbacks offer: settings checked up front, then `ladle.soup`.

A recipe typo should fail when the callback is built, not after hours of
training, so `SoupPlan` parses the recipe and checks the options against
`ladle.soup.soup`'s signature at construction.
"""

from __future__ import annotations

import inspect
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ladle.averaging.recipe_parsing import parse_recipe
from ladle.averaging.selection import select
from ladle.averaging.soups import SoupResult, soup
from ladle.errors import ConfigError
from ladle.store.run import Run

log = logging.getLogger("ladle")

# Arguments of ladle.soup.soup that the callbacks set themselves.
_RESERVED = frozenset({"run", "recipe", "output", "into_run", "force", "progress"})


@dataclass(kw_only=True)
class SoupPlan:
    """An optional soup made when training ends, and whether it is loaded into the model."""

    recipe: str | None = None
    """A soup recipe ("last:5", "top:5:val_loss:min", ...); None makes no soup."""
    output: str | os.PathLike[str] | None = None
    """Where the soup goes (a file for Lightning, a model folder for transformers)."""
    load: bool = False
    """Load the soup's weights into the trained model afterwards."""
    options: Mapping[str, Any] | None = field(default=None)
    """Further keyword arguments of `ladle.soup` (`weights=`, `window=`, `key="ema"`, `evaluate=` ...)."""

    def __post_init__(self) -> None:
        self.options = dict(self.options or {})
        if self.recipe is None:
            if self.load or self.output is not None or self.options:
                raise ConfigError("load_soup/soup_output/soup_options need a recipe, e.g. soup='last:5'")
            return
        if not isinstance(self.recipe, str) or not self.recipe.strip():
            raise ConfigError(f"soup={self.recipe!r} is not a recipe; write e.g. 'last:5'")
        accepted = set(inspect.signature(soup).parameters) - _RESERVED
        unknown = sorted(set(self.options) - accepted)
        if unknown:
            raise ConfigError(
                f"soup_options {unknown} are not arguments of ladle.soup; use some of {sorted(accepted)}"
            )
        parsed = parse_recipe(self.recipe, self.options.get("window"))
        if parsed.select.needs_evaluate and self.options.get("evaluate") is None:
            raise ConfigError(f"soup={self.recipe!r} needs soup_options={{'evaluate': fn}} to score soups")


def _slug(recipe: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+=-]+", "-", recipe).strip("-.")[:80] or "soup"


def soup_into_run(run: Run, plan: SoupPlan) -> SoupResult:
    """Average the run's checkpoints by `plan` into a new pinned "soup" checkpoint of the run
    (named after the recipe and the newest member's step; `-1`, `-2` ... when taken)."""
    assert plan.recipe is not None
    options = dict(plan.options or {})
    recipe, chosen = select(run, plan.recipe, window=options.pop("window", None), key=options.get("key"))
    name = options.pop("name", None)
    if name is None:
        newest = max(chosen, key=lambda c: (c.step, c.seq))
        base = f"soup-{_slug(str(recipe))}-{newest.step:09d}"
        taken = {c.name for c in run.checkpoints()}
        name, suffix = base, 1
        while name in taken:
            name, suffix = f"{base}-{suffix}", suffix + 1
    result = soup(run, recipe, into_run=True, name=name, **options)
    log.info("soup %s of %d checkpoints committed as %s", recipe, len(result.members), name)
    return result


def soup_to_file(run: Run, plan: SoupPlan, output: str | os.PathLike[str]) -> SoupResult:
    """Average the run's checkpoints by `plan` into the file `output` (replaced if present)."""
    assert plan.recipe is not None
    result = soup(run, plan.recipe, output=output, force=True, **dict(plan.options or {}))
    log.info("soup %s of %d checkpoints written to %s", result.recipe, len(result.members), result.path)
    return result


def soup_weights(result: SoupResult) -> dict[str, torch.Tensor]:
    """The soup's weights, from memory or from what it wrote."""
    if result.state_dict is not None:
        return result.state_dict
    path = result.path
    if path is None and result.checkpoint is not None:
        path = result.checkpoint.file("model.safetensors")
    if path is None:
        raise ConfigError("the soup kept no weights to load; this is a bug in ladle")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)
