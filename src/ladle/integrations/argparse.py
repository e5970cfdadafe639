"""Seed-style averaging flags for a user's own training script.

Many research codebases end training with "average the best k checkpoints"
behind two flags. This adds them to your `argparse` parser, spelled both ways
(`--avg_ckpts`/`--avg-ckpts`, `--num_ckpts`/`--num-ckpts`), and gives back the
model averaged from the run's top-k checkpoints by its monitored metric:

    parser = argparse.ArgumentParser()
    ladle.integrations.argparse.add_averaging_args(parser)
    args = parser.parse_args()
    ...                                            # train with a CheckpointManager(monitor=...)
    model = averaged_model(args, "runs/exp1", model)   # the top-k soup when --avg_ckpts is given
"""

from __future__ import annotations

import argparse
import os
from typing import Any

import torch
from torch import nn

from ladle.store.run import Run

DEFAULT_NUM_CKPTS = 5


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def add_averaging_args(
    parser: argparse.ArgumentParser, *, default_num_ckpts: int = DEFAULT_NUM_CKPTS
) -> argparse.ArgumentParser:
    """Add `--avg_ckpts` and `--num_ckpts` (with dash spellings too) to `parser`; returns it."""
    group = parser.add_argument_group("checkpoint averaging (ladle)")
    group.add_argument(
        "--avg_ckpts",
        "--avg-ckpts",
        dest="avg_ckpts",
        action="store_true",
        help="use the average of the run's best checkpoints (by its monitored metric)",
    )
    group.add_argument(
        "--num_ckpts",
        "--num-ckpts",
        dest="num_ckpts",
        type=_positive_int,
        default=default_num_ckpts,
        metavar="K",
        help=f"how many of the best checkpoints to average (default {default_num_ckpts})",
    )
    return parser


def averaged_state_dict(
    args: argparse.Namespace, run: Run | str | os.PathLike[str], **soup_options: Any
) -> dict[str, torch.Tensor] | None:
    """The top-`num_ckpts` soup of `run` when `--avg_ckpts` was given, else None.

    `soup_options` go to `ladle.soup` (for example `key="ema"`, `window=...`).
    """
    from ladle.averaging.soups import soup

    if not getattr(args, "avg_ckpts", False):
        return None
    k = getattr(args, "num_ckpts", DEFAULT_NUM_CKPTS)
    result = soup(run, f"top:{k}", **soup_options)
    return result.state_dict


def averaged_model(
    args: argparse.Namespace, run: Run | str | os.PathLike[str], model: nn.Module, **soup_options: Any
) -> nn.Module:
    """`model` with the top-k soup loaded when `--avg_ckpts` was given; unchanged otherwise."""
    from ladle.state.model_weights import load_model_weights

    state = averaged_state_dict(args, run, **soup_options)
    if state is not None:
        load_model_weights(model, state, strict=True)
    return model
