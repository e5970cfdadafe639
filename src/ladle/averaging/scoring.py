"""Scoring a soup on held-out data: the user's `evaluate`, BatchNorm recalibration first.

`evaluate(model_or_state_dict)` returns a metrics mapping, one number, or, for
a metric that is a mean over validation examples (accuracy, NLL), a 1-D tensor
(or list, or array) holding the per-example values: the score is their mean,
and greedy's `accept="halves"` rule compares them example by example.

With `recalibrate=` (training batches, as `ladle.recalibrate_bn` takes them,
in an iterable that can be iterated again: a list or a DataLoader), an average
of two or more members has its BatchNorm statistics re-estimated before it is
scored, and those statistics are the ones written with the soup. A single
checkpoint keeps its own statistics: they belong to its weights.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ladle.averaging.bn import batchnorm_buffers, recalibrate_seeded
from ladle.errors import ConfigError

Evaluate = Callable[[Any], "Mapping[str, Any] | float"]
"""evaluate(model or state dict) -> a metrics mapping (or one number) on held-out data."""
ModelLike = nn.Module | Callable[[], nn.Module]
"""A model, or a function that builds one, that `evaluate` receives loaded with a soup."""


def _per_example(value: Any) -> torch.Tensor | None:
    """Per-example values as a 1-D float64 tensor, or None for a single number."""
    if isinstance(value, torch.Tensor):
        return value.detach().reshape(-1).to("cpu", torch.float64) if value.ndim >= 1 else None
    if isinstance(value, list | tuple) or getattr(value, "ndim", 0) >= 1:
        try:
            return torch.as_tensor(value, dtype=torch.float64).reshape(-1)
        except (TypeError, ValueError):
            return None
    return None


@dataclass(kw_only=True)
class Evaluation:
    """What one call of `evaluate` said about one set of weights."""

    score: float
    """The recipe's metric (the mean, when evaluate returned per-example values)."""
    values: torch.Tensor | None = None
    """Per-example values of the metric (1-D float64), when evaluate returned them."""
    metrics: dict[str, float] = field(default_factory=dict)
    """Every number evaluate returned, per-example values reduced to their mean."""


def evaluation_of(result: Any, metric: str | None) -> Evaluation:
    """Read what `evaluate` returned: a mapping, a number, a 0-d tensor, or per-example values.

    A metric given as a 1-D tensor, list or array holds one value per validation
    example; its score is their mean (so it must be a mean: accuracy, NLL, ...).
    With `metric=None` a mapping gives every number it holds and a score of NaN.
    """
    if isinstance(result, Mapping):
        if metric is not None and metric not in result:
            raise ConfigError(
                f"evaluate returned {', '.join(map(str, sorted(result))) or 'nothing'} but the recipe "
                f"needs {metric!r}; return a dict holding {metric!r} or fix the recipe's metric"
            )
        metrics = {}
        for name, value in result.items():
            values = _per_example(value)
            if values is not None and values.numel():
                metrics[str(name)] = float(values.mean())
            elif hasattr(value, "item") or (isinstance(value, int | float) and not isinstance(value, bool)):
                metrics[str(name)] = float(value.item() if hasattr(value, "item") else value)
        if metric is None:
            return Evaluation(score=math.nan, metrics=metrics)
        chosen = result[metric]
    else:
        metrics, chosen = {}, result
    what = repr(metric) if metric is not None else "the soup"
    values = _per_example(chosen)
    if values is not None:
        if not values.numel():
            raise ConfigError(f"evaluate returned no per-example values for {what}")
        score = float(values.mean())
    else:
        if hasattr(chosen, "item"):
            chosen = chosen.item()
        if isinstance(chosen, bool) or not isinstance(chosen, int | float):
            raise ConfigError(f"evaluate returned {type(chosen).__name__} for {what}; return a number")
        score = float(chosen)
    if metric is not None:
        metrics.setdefault(metric, score)
    return Evaluation(score=score, values=values, metrics=metrics)


def score_of(result: Any, metric: str | None) -> float:
    """The number `metric` from what `evaluate` returned (see `evaluation_of`)."""
    return evaluation_of(result, metric).score


class Scorer:
    """Runs the user's evaluate on a state dict, through their model when they gave one.

    With `recalibrate` (training batches), `load(state, recalibrate=True)` and
    `__call__(state, recalibrate=True)` re-estimate the model's BatchNorm
    statistics after loading, under a fixed torch seed (`recalibrate_seeded`),
    so dropout draws the same masks each time and the statistics written with
    the soup are exactly those it was scored with (`batchnorm_buffers`).
    `metric=None` reads every number evaluate returns (non-greedy soups).
    """

    def __init__(
        self,
        evaluate: Evaluate | None,
        model: ModelLike | None,
        metric: str | None,
        *,
        recalibrate: Iterable[Any] | None = None,
    ) -> None:
        self.evaluate = evaluate
        self.metric = metric
        self.loader = recalibrate
        self.model: nn.Module | None = None
        if isinstance(model, nn.Module):
            self.model = model
        elif model is not None:
            built = model()
            if not isinstance(built, nn.Module):
                raise ConfigError(f"model factory returned {type(built).__name__}, not an nn.Module")
            self.model = built
        if recalibrate is not None and self.model is None:
            raise ConfigError(
                "recalibrate= needs model= (--model module:factory): BatchNorm statistics are "
                "re-estimated by running the model"
            )

    def load(self, state: Mapping[str, torch.Tensor], *, recalibrate: bool = False) -> None:
        """Load `state` into the model, then re-estimate its BatchNorm statistics if asked."""
        from ladle.state.model_weights import load_model_weights

        assert self.model is not None
        with torch.no_grad():
            load_model_weights(self.model, state, strict=True)
            if recalibrate and self.loader is not None:
                recalibrate_seeded(self.model, self.loader)

    def __call__(self, state: Mapping[str, torch.Tensor], *, recalibrate: bool = False) -> Evaluation:
        assert self.evaluate is not None
        # Scoring never needs gradients; no_grad keeps evaluation memory at inference size.
        with torch.no_grad():
            if self.model is None:
                return evaluation_of(self.evaluate(dict(state)), self.metric)
            self.load(state, recalibrate=recalibrate)
            return evaluation_of(self.evaluate(self.model), self.metric)

    def batchnorm_buffers(self, like: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The model's current BatchNorm statistics, keyed and typed as in `like`."""
        assert self.model is not None
        return batchnorm_buffers(self.model, like)


def finish_soup(
    state: dict[str, torch.Tensor],
    *,
    members: int,
    batchnorm_layers: int,
    evaluate: Evaluate | None,
    model: ModelLike | None,
    recalibrate: Iterable[Any] | None,
) -> tuple[dict[str, torch.Tensor], Evaluation | None, bool]:
    """A non-greedy soup made ready: BatchNorm statistics re-estimated (when asked and when they
    are averaged ones) and scored by `evaluate` (when given).

    Returns the state (with the new statistics), its evaluation (None without
    `evaluate`) and whether it was recalibrated.
    """
    scorer = Scorer(evaluate, model, None, recalibrate=recalibrate)
    recalibrated = recalibrate is not None and members > 1 and batchnorm_layers > 0
    if recalibrated:
        scorer.load(state, recalibrate=True)
        state = {**state, **scorer.batchnorm_buffers(state)}
    evaluation = scorer(state) if evaluate is not None else None
    return state, evaluation, recalibrated


__all__ = ["Evaluate", "Evaluation", "ModelLike", "Scorer", "evaluation_of", "finish_soup", "score_of"]
