"""A transformers Trainer output directory made without ladle, read without importing transformers.

The reading lives in `ladle.trainer_dirs` (so `ladle.soup`, `ladle avg` and
`ladle soup` accept such a directory too); this module keeps its names for
the integration and adds `soup_trainer_output`, the soup of a plain Trainer
run into a `from_pretrained` folder.
"""

from __future__ import annotations

import contextlib
import os

import torch

from ladle.averaging.int_policies import IntPolicy
from ladle.averaging.recipe_parsing import parse_recipe
from ladle.averaging.soups import SoupResult, soup
from ladle.averaging.weights import WeightsLike
from ladle.errors import ConfigError
from ladle.store.foreign_runs import TrainerOutput
from ladle.store.trainer_dirs import (
    CHECKPOINT_PREFIX,
    TRAINER_STATE,
    TRAINING_FILES,
    WEIGHT_FILE_RE,
    checkpoint_step,
    copy_model_files,
    epoch_index,
    has_weights,
    is_model_file,
    is_trainer_output,
    metrics_at,
    read_trainer_state,
    trainer_checkpoints,
)

SOUP_FOLDER = "soup"


def soup_trainer_output(
    output_dir: str | os.PathLike[str],
    recipe: str = "uniform",
    destination: str | os.PathLike[str] | None = None,
    *,
    window: str | None = None,
    weights: WeightsLike = "uniform",
    dtype: str | torch.dtype | None = None,
    accumulate: str | torch.dtype = "float32",
    int_policy: IntPolicy | str = IntPolicy.NEWEST,
    force: bool = False,
) -> SoupResult:
    """Average the checkpoints of a plain Trainer output directory into a `from_pretrained` folder.

    No ladle run is needed: checkpoints and their metrics come from
    `trainer_state.json` (see `trainer_checkpoints`), so `top:5:eval_loss:min`
    works on any Trainer run. `destination` (default `<output_dir>/soup`)
    receives `model.safetensors` (provenance in its metadata and
    `model.safetensors.json`) and the newest member's config, generation
    config and tokenizer files. Greedy recipes need an `evaluate` function:
    call `ladle.soup(output_dir, recipe, evaluate=..., output=folder)`.
    """
    root = os.path.abspath(os.fspath(output_dir))
    parsed = parse_recipe(recipe, window)
    if parsed.select.needs_evaluate:
        raise ConfigError(
            f"recipe {parsed} needs evaluate=; call ladle.soup({root!r}, {str(parsed)!r}, evaluate=..., "
            "output=FOLDER)"
        )
    target = os.path.abspath(os.fspath(destination or os.path.join(root, SOUP_FOLDER)))
    made = not os.path.lexists(target)
    if made:
        os.makedirs(target)  # an existing folder is always a folder output, whatever its name
    try:
        return soup(
            TrainerOutput(root),
            parsed,
            output=target,
            weights=weights,
            dtype=dtype,
            accumulate=accumulate,
            int_policy=int_policy,
            force=force,
        )
    except BaseException:
        if made:
            with contextlib.suppress(OSError):
                os.rmdir(target)  # only when still empty
        raise


__all__ = [
    "CHECKPOINT_PREFIX",
    "SOUP_FOLDER",
    "TRAINER_STATE",
    "TRAINING_FILES",
    "WEIGHT_FILE_RE",
    "TrainerOutput",
    "checkpoint_step",
    "copy_model_files",
    "epoch_index",
    "has_weights",
    "is_model_file",
    "is_trainer_output",
    "metrics_at",
    "read_trainer_state",
    "soup_trainer_output",
    "trainer_checkpoints",
]
