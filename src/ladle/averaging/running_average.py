"""A uniform average kept in memory that grows one member at a time (greedy soups)."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ladle.averaging.int_policies import combine_ints
from ladle.averaging.members import Member
from ladle.averaging.plan import AverageOptions, Kind, Plan
from ladle.errors import ConfigError

Rank = tuple[int, int]
"""(step, position): orders members for the integer policy (the newest is the highest)."""


class RunningAverage:
    """Holds the running sum of every floating tensor in the accumulator dtype (one model)
    and the integer tensors of the members added so far, so trying a candidate costs
    reading that candidate once: never the other members.
    """

    def __init__(self, plan: Plan, options: AverageOptions) -> None:
        self.plan = plan
        self.options = options
        self.count = 0
        self._sums: dict[str, torch.Tensor] = {}
        self._ints: dict[str, list[tuple[Rank, torch.Tensor]]] = {}

    @staticmethod
    def load(member: Member, plan: Plan) -> dict[str, torch.Tensor]:
        """A member's stored tensors, read once (owned copies, not file mappings)."""
        out = {}
        for key in plan.keys:
            out[key] = member.source.tensor(key).clone()
            member.source.release(key)
        return out

    def state(
        self, candidate: Mapping[str, torch.Tensor] | None = None, rank: Rank = (0, 0)
    ) -> dict[str, torch.Tensor]:
        """The average of the members added so far, plus `candidate` if given."""
        n = self.count + (candidate is not None)
        if n == 0:
            raise ConfigError("the running average is empty; add a member first")
        stored: dict[str, torch.Tensor] = {}
        for key, plan in self.plan.keys.items():
            if plan.kind is Kind.FLOAT:
                total = self._sums.get(key)
                if candidate is not None:
                    extra = candidate[key].to(plan.acc_dtype)
                    total = extra if total is None else total + extra
                assert total is not None  # n > 0
                stored[key] = (total / n).to(plan.out_dtype)
            else:
                entries = list(self._ints.get(key, []))
                if candidate is not None:
                    entries.append((rank, candidate[key]))
                entries.sort(key=lambda e: e[0])
                stored[key] = combine_ints(
                    self.options.policy,
                    key,
                    count=len(entries),
                    read=[value for _, value in entries].__getitem__,
                    labels=[f"the member of step {r[0]}" for r, _ in entries],
                    newest=len(entries) - 1,
                )
        return {k: stored[self.plan.ties.get(k, k)] for k in self.plan.order}

    def add(self, tensors: Mapping[str, torch.Tensor], rank: Rank) -> None:
        """Add a member (its tensors from `load`); `rank` orders members for the int policy."""
        for key, plan in self.plan.keys.items():
            if plan.kind is Kind.FLOAT:
                value = tensors[key].to(plan.acc_dtype)
                if key in self._sums:
                    self._sums[key].add_(value)
                else:
                    self._sums[key] = value.clone() if value.data_ptr() == tensors[key].data_ptr() else value
            else:
                self._ints.setdefault(key, []).append((rank, tensors[key]))
        self.count += 1


__all__ = ["Rank", "RunningAverage"]
