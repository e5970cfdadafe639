"""The demo's tables: one run's contenders, and the summary over several seeds.

Every contender is compared with the best single checkpoint (chosen by
validation) on test accuracy, counted in examples: more correct is a win,
as many is a tie, fewer is a loss. The table prints that verdict beside the
numbers, so a recipe that loses says so.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from rich import box
from rich.table import Table
from rich.text import Text

from ladle.demo.contenders import Contender

REFERENCE = "best"
"""The contender every other one is compared with."""


def verdict(contender: Contender, reference: Contender) -> str:
    """ "win", "tie" or "loss" against the reference, by correct test predictions."""
    if contender.test.correct > reference.test.correct:
        return "win"
    if contender.test.correct < reference.test.correct:
        return "loss"
    return "tie"


def reference_of(contenders: Sequence[Contender]) -> Contender:
    return next(c for c in contenders if c.key == REFERENCE)


_STYLE = {"win": "green", "tie": "yellow", "loss": "red"}
_WORDS = {"win": "beats", "tie": "ties", "loss": "loses"}


def run_table(
    contenders: Sequence[Contender], *, title: str | None = None, ema_decay: float | None = None
) -> Table:
    """The table of one run: members, forward passes, test accuracy and NLL, verdict.

    The verdict counts correct test predictions against the best single
    checkpoint: "beats (+3)" means three more test images right.
    """
    reference = reference_of(contenders)
    table = Table(
        title=title,
        title_justify="left",
        caption_justify="left",
        header_style="bold",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        show_edge=False,
    )
    table.add_column("final model", no_wrap=True)
    table.add_column("members", justify="right", min_width=7)
    table.add_column("passes", justify="right", min_width=6)
    table.add_column("test acc", justify="right")
    table.add_column("test NLL", justify="right")
    table.add_column("vs best", no_wrap=True)
    for c in contenders:
        if c is reference:
            outcome = Text("reference", style="dim")
        else:
            result = verdict(c, reference)
            delta = c.test.correct - reference.test.correct
            outcome = Text(
                f"{_WORDS[result]} ({delta:+d})" if delta else _WORDS[result], style=_STYLE[result]
            )
        table.add_row(
            c.label,
            str(len(c.members)),
            str(c.forward_passes),
            f"{100 * c.test.acc:.2f}%",
            f"{c.test.nll:.4f}",
            outcome,
            style="bold" if c is reference else None,
        )
    table.caption = recipes_caption(contenders, ema_decay)
    return table


def recipes_caption(contenders: Sequence[Contender], ema_decay: float | None = None) -> str:
    """How each row was chosen, for the lines under a table."""
    soups = [c for c in contenders if c.kind == "soup" and c.recipe]
    decay = f" (decay {ema_decay:g})" if ema_decay is not None else ""
    lines = [
        f"chosen on validation data only: best checkpoint = lowest val_nll; EMA{decay} at its best = "
        "lowest val_ema_nll;",
        "soups: " + "; ".join(f"{c.label.removeprefix('soup: ')} = {c.recipe}" for c in soups),
    ]
    return "\n".join(lines)


@dataclass(kw_only=True, frozen=True)
class Summary:
    """One contender over several seeds."""

    key: str
    label: str
    members_mean: float
    members_min: int
    members_max: int
    forward_passes: int
    acc_mean: float
    acc_std: float
    nll_mean: float
    nll_std: float
    f1_mean: float
    f1_std: float
    wins: int
    ties: int
    losses: int

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)


def _std(values: Sequence[float]) -> float:
    # Sample standard deviation; a single seed has none.
    return statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(per_seed: Sequence[Sequence[Contender]]) -> list[Summary]:
    """Mean ± std of each contender's test scores, and its wins/ties/losses against the best single."""
    keys = [c.key for c in per_seed[0]]
    out = []
    for key in keys:
        rows = [next(c for c in contenders if c.key == key) for contenders in per_seed]
        outcomes = [
            verdict(row, reference_of(contenders)) for row, contenders in zip(rows, per_seed, strict=True)
        ]
        sizes = [len(r.members) for r in rows]
        out.append(
            Summary(
                key=key,
                label=rows[0].label,
                members_mean=statistics.fmean(sizes),
                members_min=min(sizes),
                members_max=max(sizes),
                forward_passes=max(r.forward_passes for r in rows),
                acc_mean=statistics.fmean(r.test.acc for r in rows),
                acc_std=_std([r.test.acc for r in rows]),
                nll_mean=statistics.fmean(r.test.nll for r in rows),
                nll_std=_std([r.test.nll for r in rows]),
                f1_mean=statistics.fmean(r.test.f1 for r in rows),
                f1_std=_std([r.test.f1 for r in rows]),
                wins=outcomes.count("win"),
                ties=outcomes.count("tie"),
                losses=outcomes.count("loss"),
            )
        )
    return out


def summary_table(summaries: Sequence[Summary], seeds: Sequence[int], *, title: str | None = None) -> Table:
    """Mean ± std over seeds, with wins/ties/losses against the best single checkpoint."""
    table = Table(
        title=title,
        title_justify="left",
        caption_justify="left",
        header_style="bold",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        show_edge=False,
    )
    table.add_column("final model", no_wrap=True)
    table.add_column("members", justify="right", min_width=7)
    table.add_column("passes", justify="right", min_width=6)
    table.add_column("test acc %", justify="right", no_wrap=True)
    table.add_column("test NLL", justify="right", no_wrap=True)
    table.add_column("W/T/L", justify="center", no_wrap=True)
    for s in summaries:
        if s.members_min == s.members_max:
            members = str(s.members_min)
        else:
            members = f"{s.members_mean:.1f}"
        if s.key == REFERENCE:
            record = Text("reference", style="dim")
        else:
            style = "green" if s.wins > s.losses else "red" if s.losses > s.wins else "yellow"
            record = Text(f"{s.wins}/{s.ties}/{s.losses}", style=style)
        table.add_row(
            s.label,
            members,
            str(s.forward_passes),
            f"{100 * s.acc_mean:.2f} ± {100 * s.acc_std:.2f}",
            f"{s.nll_mean:.3f} ± {s.nll_std:.3f}",
            record,
            style="bold" if s.key == REFERENCE else None,
        )
    table.caption = (
        f"mean ± std over seeds {', '.join(map(str, seeds))}; W/T/L: seeds where it got more, as many, "
        "fewer test images right than the best checkpoint"
    )
    return table
