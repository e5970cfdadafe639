"""Integer and bool tensors in an average: never averaged as floats, a stated policy decides.

BatchNorm's `num_batches_tracked`, step counters and masks are integers: a
float mean would be meaningless or silently truncated. `combine_ints` is the one
implementation of every policy; the streaming engine and the in-memory
`RunningAverage` (greedy soups) both call it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from enum import Enum

import torch

from ladle.errors import IncompatibleMembers


class IntPolicy(str, Enum):
    """What an average does with integer and bool tensors, which it never averages as floats."""

    NEWEST = "newest"
    """Copy the newest member's value (highest step; the last listed when steps are unknown)."""
    FIRST = "first"
    """Copy the first member's value."""
    FLOOR_MEAN = "floor-mean"
    """Floor of the (weighted) mean, as fairseq does: [7,8,9] and [2,2,2] give [4,5,5]."""
    ERROR = "error"
    """Refuse when members disagree on any integer tensor."""


def _no_release(index: int) -> None:
    """Nothing to release (tensors held in memory)."""


def combine_ints(
    policy: IntPolicy,
    key: str,
    *,
    count: int,
    read: Callable[[int], torch.Tensor],
    labels: Sequence[str],
    newest: int,
    weights: Sequence[float] | None = None,
    release: Callable[[int], None] = _no_release,
) -> torch.Tensor:
    """The integer tensor `key` of an average of `count` members, by `policy`.

    `read(i)` gives member i's tensor (it may live in a reused buffer: what is
    kept is copied) and `release(i)` says it is done with. Only the members the
    policy needs are read. `weights=None` means uniform (the floor of the exact
    integer mean); weights give the floor of the weighted mean, rounding values
    within 1e-9 of an integer to it (weights that sum to one in exact arithmetic
    may land a hair under one).
    """
    if policy is IntPolicy.NEWEST or policy is IntPolicy.FIRST:
        index = newest if policy is IntPolicy.NEWEST else 0
        out = read(index).clone()
        release(index)
        return out
    if policy is IntPolicy.ERROR:
        reference = read(0).clone()
        release(0)
        for i in range(1, count):
            if not torch.equal(read(i), reference):
                raise IncompatibleMembers(
                    f"{key!r}: integer values differ between {labels[0]} and {labels[i]}; choose another "
                    "int_policy (--int-policy newest|first|floor-mean)"
                )
            release(i)
        return reference
    # floor-mean
    first = read(0)
    dtype = first.dtype
    if weights is None:
        total = first.to(torch.int64, copy=True)
        release(0)
        for i in range(1, count):
            total.add_(read(i).to(torch.int64))
            release(i)
        mean = torch.div(total, count, rounding_mode="floor")
    else:
        total64 = first.to(torch.float64, copy=True).mul_(weights[0])
        release(0)
        for i in range(1, count):
            total64.add_(read(i).to(torch.float64), alpha=weights[i])
            release(i)
        nearest = torch.round(total64)
        close = (total64 - nearest).abs() <= 1e-9 * nearest.abs().clamp(min=1.0)
        mean = torch.where(close, nearest, torch.floor(total64)).to(torch.int64)
    return mean.to(dtype)


__all__ = ["IntPolicy", "combine_ints"]
