"""Greedy soups (Wortsman et al. 2022, "Model soups"): the search itself.

Every candidate is scored on its own with the user's `evaluate` (or by its
recorded metric with `rank="recorded"`); the best starts the soup, and each
next candidate, best first, joins if the recipe's acceptance rule says so:

- `no-worse` (default, Wortsman et al.'s `>=`): the soup's score with it is not
  worse. On a small validation set accuracy ties are common and this accepts
  nearly every candidate.
- `better`: strictly better.
- `halves`: strictly better on the whole validation set and on both halves of
  each of `HALVES` seeded random splits of it, compared example by example
  (evaluate returns per-example values, see `ladle.averaging.scoring`). An
  improvement carried by a handful of examples fails on the half without them.

Each step records why it was accepted or rejected. With `recalibrate=`,
every average of two or more members has its BatchNorm statistics
re-estimated before it is scored, and the soup keeps the statistics it was
scored with. The running sum stays in memory (`RunningAverage`), so each
candidate is read once. The caller (`ladle.soup`) writes the result and its
provenance.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ladle.averaging.members import Member
from ladle.averaging.plan import AverageOptions, Plan
from ladle.averaging.recipes import Accept, Greedy
from ladle.averaging.running_average import RunningAverage
from ladle.averaging.scoring import Evaluate, Evaluation, ModelLike, Scorer, evaluation_of, score_of
from ladle.errors import ConfigError
from ladle.metrics import Mode, is_finite_number
from ladle.store.checkpoint import CheckpointInfo

log = logging.getLogger("ladle")

RANKS = ("evaluate", "recorded")
"""How candidates are ordered: by their own held-out score, or by their recorded metric."""
HALVES = 10
"""Seeded random splits of the validation set whose both halves `accept="halves"` checks."""


@dataclass(kw_only=True)
class GreedyStep:
    """One step of a greedy search."""

    name: str
    """The candidate checkpoint."""
    step: int
    """Its training step."""
    score: float
    """Its own held-out score."""
    soup_score: float
    """The soup's score with the candidate added."""
    accepted: bool
    """Whether it joined the soup (by the recipe's acceptance rule)."""
    size: int
    """Members in the soup after this step."""
    reason: str = ""
    """Why it was accepted or rejected, in words (scores compared, ties, halves that held)."""


@dataclass(kw_only=True)
class GreedyOutcome:
    """What a greedy search accepted, and the soup it made."""

    accepted: list[CheckpointInfo]
    """The accepted checkpoints, oldest first."""
    members: list[Member]
    """Their open members, in the same order."""
    steps: list[GreedyStep]
    """Every step of the search, in the order tried."""
    state: dict[str, torch.Tensor]
    """The soup's weights (uniform average of the accepted members)."""
    score: float
    """The soup's held-out score."""
    metrics: dict[str, float] = field(default_factory=dict)
    """Everything evaluate returned for the final soup (per-example values as their mean)."""
    recalibrated: bool = False
    """Whether `state` holds BatchNorm statistics re-estimated on the recalibration data."""


def _rank_value(score: float, mode: Mode) -> float:
    if not math.isfinite(score):
        return math.inf
    return -score if mode is Mode.MAX else score


def _better(new: float, old: float, mode: Mode) -> bool:
    return math.isfinite(new) and (new > old if mode is Mode.MAX else new < old)


def _half_splits(n: int) -> list[torch.Tensor]:
    """Index sets of both halves of `HALVES` seeded random splits of n examples."""
    generator = torch.Generator().manual_seed(0)
    halves = []
    for _ in range(HALVES):
        order = torch.randperm(n, generator=generator)
        halves.extend([order[: n // 2], order[n // 2 :]])
    return halves


def decide(
    rule: Accept, mode: Mode, tried: Evaluation, current: Evaluation, halves: list[torch.Tensor] | None
) -> tuple[bool, str]:
    """Whether a candidate joins (soup with it: `tried`; without: `current`), and why, in words."""
    change = f"{current.score:.6g} -> {tried.score:.6g}"
    if not math.isfinite(tried.score):
        return False, f"rejected: the soup with it scores {tried.score} (not finite)"
    if rule is Accept.NO_WORSE:
        if tried.score == current.score:
            return True, f"accepted: tie at {tried.score:.6g} (no-worse accepts ties)"
        if _better(tried.score, current.score, mode):
            return True, f"accepted: better, {change}"
        return False, f"rejected: worse, {change}"
    if tried.score == current.score:
        return False, f"rejected: tie at {tried.score:.6g} ({rule.value} needs an improvement)"
    if not _better(tried.score, current.score, mode):
        return False, f"rejected: worse, {change}"
    if rule is Accept.BETTER:
        return True, f"accepted: better, {change}"
    assert halves is not None and tried.values is not None and current.values is not None
    diff = tried.values - current.values
    if mode is Mode.MIN:
        diff = -diff
    held = sum(1 for half in halves if float(diff[half].sum()) > 0)
    if held == len(halves):
        return True, f"accepted: better, {change}, and better on all {held} halves"
    return False, f"rejected: better, {change}, but only on {held} of {len(halves)} halves"


def _check_values(evaluation: Evaluation, metric: str, n: int | None) -> int:
    if evaluation.values is None:
        raise ConfigError(
            f"greedy accept=halves needs per-example values: let evaluate return {{{metric!r}: "
            "a 1-D tensor with one value per validation example} (its mean is the score)"
        )
    count = int(evaluation.values.numel())
    if n is not None and count != n:
        raise ConfigError(
            f"evaluate returned {count} per-example values for {metric!r}, earlier {n}; "
            "score the same validation examples in the same order every time"
        )
    if count < 4:
        raise ConfigError(f"greedy accept=halves needs at least 4 validation examples, got {count}")
    return count


def greedy_search(
    greedy: Greedy,
    chosen: Sequence[CheckpointInfo],
    members: Sequence[Member],
    plan: Plan,
    options: AverageOptions,
    *,
    evaluate: Evaluate,
    model: ModelLike | None,
    rank: str,
    recalibrate: Iterable[Any] | None = None,
) -> GreedyOutcome:
    """Search the soup: candidates best first, each kept only if the acceptance rule says so.

    With `recalibrate`, every soup of two or more members has its BatchNorm
    statistics re-estimated before it is scored, and the returned state holds
    the statistics the final soup was scored with. A soup of one member keeps
    the member's own statistics (they belong to its weights), so a search that
    accepts nothing else returns the best candidate exactly.
    """
    if rank not in RANKS:
        raise ConfigError(f"rank={rank!r} is not known; use 'evaluate' or 'recorded'")
    scorer = Scorer(evaluate, model, greedy.metric, recalibrate=recalibrate)
    position = {info.name: i for i, info in enumerate(chosen)}
    halves_rule = greedy.accept is Accept.HALVES
    n_values: int | None = None

    # Individual scores: the held-out score of each candidate on its own.
    own: dict[str, Evaluation] = {}
    scores: dict[str, float] = {}
    for info, member in zip(chosen, members, strict=True):
        if rank == "recorded":
            value = info.metrics.get(greedy.metric)
            if not is_finite_number(value):
                raise ConfigError(
                    f"{info.path}: no finite recorded {greedy.metric!r}; use rank='evaluate' to score it"
                )
            scores[info.name] = float(value)  # type: ignore[arg-type]
        else:
            single = RunningAverage(plan, options)
            single.add(RunningAverage.load(member, plan), (info.step, position[info.name]))
            own[info.name] = scorer(single.state())
            if halves_rule:
                n_values = _check_values(own[info.name], greedy.metric, n_values)
            scores[info.name] = own[info.name].score
            log.info("greedy: %s scores %s=%.6g on its own", info.name, greedy.metric, scores[info.name])
    order = sorted(chosen, key=lambda c: (_rank_value(scores[c.name], greedy.mode), -c.seq))
    if not math.isfinite(scores[order[0].name]):
        raise ConfigError(f"greedy: no candidate has a finite {greedy.metric!r}; check evaluate")

    soup_avg = RunningAverage(plan, options)
    steps: list[GreedyStep] = []
    accepted: list[CheckpointInfo] = []
    current: Evaluation | None = None
    halves: list[torch.Tensor] | None = None
    statistics: dict[str, torch.Tensor] | None = None
    for info in order:
        member = members[position[info.name]]
        tensors = RunningAverage.load(member, plan)
        rank_key = (info.step, position[info.name])
        tried = soup_avg.state(tensors, rank_key)
        if current is None:
            # The best candidate starts the soup; scored here too when ranked by recorded values,
            # so that an evaluate returning the wrong metric fails before any candidate is tried.
            tried_eval = own.get(info.name) or scorer(tried)
            if halves_rule:
                n_values = _check_values(tried_eval, greedy.metric, n_values)
                halves = _half_splits(n_values)
            ok, reason = True, f"accepted: the best on its own ({greedy.metric}={tried_eval.score:.6g})"
        else:
            recalibrated = recalibrate is not None and plan.batchnorm_layers > 0
            tried_eval = scorer(tried, recalibrate=recalibrated)
            if halves_rule:
                _check_values(tried_eval, greedy.metric, n_values)
            ok, reason = decide(greedy.accept, greedy.mode, tried_eval, current, halves)
            if ok and recalibrated:
                statistics = scorer.batchnorm_buffers(tried)
        if ok:
            soup_avg.add(tensors, rank_key)
            accepted.append(info)
            current = tried_eval
        steps.append(
            GreedyStep(
                name=info.name,
                step=info.step,
                score=scores[info.name],
                soup_score=tried_eval.score,
                accepted=ok,
                size=len(accepted),
                reason=reason,
            )
        )
        log.info("greedy: %s %s; soup has %d", info.name, reason, len(accepted))
        del tried, tensors
    assert current is not None
    state = soup_avg.state()
    if statistics is not None and len(accepted) > 1:
        state.update(statistics)
    accepted.sort(key=lambda c: (c.step, c.seq, c.name))
    return GreedyOutcome(
        accepted=accepted,
        members=[members[position[c.name]] for c in accepted],
        steps=steps,
        state=state,
        score=current.score,
        metrics=current.metrics,
        recalibrated=statistics is not None and len(accepted) > 1,
    )


__all__ = [
    "HALVES",
    "RANKS",
    "Evaluate",
    "Evaluation",
    "GreedyOutcome",
    "GreedyStep",
    "ModelLike",
    "Scorer",
    "decide",
    "evaluation_of",
    "greedy_search",
    "score_of",
]
