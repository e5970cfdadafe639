"""The final models the demo compares, each built by ladle from the run and scored from its file.

Single checkpoints (the last, the best by validation NLL), the EMA weights
saved with the last checkpoint and with the checkpoint where they scored the
best validation NLL, four soups written by `ladle.soup`, and a
prediction ensemble of the top K as the reference that costs K forward
passes. Validation data chooses (the best checkpoint, the top K, the greedy
soup's members); test data only scores.

In the small-validation-set scenario the network has BatchNorm: every soup
is recalibrated on the training data (`recalibrate=`), and two more greedy
soups search on validation NLL, the second only accepting what holds on
both halves of random splits (`GREEDY_NLL`, `GREEDY_HALVES`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ladle.averaging.soups import soup
from ladle.demo.config import DemoConfig
from ladle.demo.data import Splits
from ladle.demo.evaluation import Scores, per_example, score_files, score_model
from ladle.demo.model import has_batchnorm, model_builder
from ladle.demo.training import EMA_MONITOR, MONITOR
from ladle.errors import CheckpointNotFound, EmptySelection
from ladle.store.checkpoint import CheckpointInfo
from ladle.store.run import Run

IMPROVED = "improved:val_acc,val_f1:max,val_nll:min"
"""Checkpoints that set a new best on any validation metric (the BirdCLEF-style soup)."""
GREEDY = "greedy:val_acc:max"
"""Wortsman et al. 2022: add members best-first while held-out accuracy does not drop."""
GREEDY_NLL = "greedy:val_nll:min"
"""Greedy on validation NLL, BatchNorm recalibrated: the recipe for small validation sets (NLL rarely
ties, so an average joins only when it lowers the NLL)."""
GREEDY_HALVES = "greedy:val_nll:min:accept=halves"
"""Greedy on validation NLL, a member joining only if the NLL improves on both halves of each of
10 random splits of the validation set: on a small set it keeps the best checkpoint unless an
average is better beyond doubt."""

BuildCallback = Callable[[str], None]
"""Called with each contender's label before it is built."""


@dataclass(kw_only=True)
class Contender:
    """One final model of the table: how it was made, what it is made of, how it scores."""

    key: str
    """Short stable identifier: last, best, ema, ema-best, last-k, top-k, improved, greedy, ensemble."""
    label: str
    """What the table calls it."""
    kind: str
    """checkpoint, ema, soup or ensemble."""
    recipe: str | None
    """The ladle recipe that chose the members (None for single checkpoints and EMA)."""
    members: list[str]
    """Checkpoint names that went in, oldest first."""
    files: list[str]
    """The weights files scored, relative to the demo's output folder (several for an ensemble)."""
    forward_passes: int
    """Network evaluations per prediction at inference."""
    val: Scores
    """Validation scores (what selection saw)."""
    test: Scores
    """Test scores (what the table reports)."""
    details: dict[str, Any] = field(default_factory=dict)
    """Recipe-specific records, e.g. every step of the greedy search."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "label": self.label,
            "kind": self.kind,
            "recipe": self.recipe,
            "members": self.members,
            "files": self.files,
            "forward_passes": self.forward_passes,
            "val": self.val.to_dict(),
            "test": self.test.to_dict(),
            **({"details": self.details} if self.details else {}),
        }


def build_contenders(
    config: DemoConfig,
    splits: Splits,
    run_dir: str,
    soups_dir: str,
    base: str,
    *,
    on_build: BuildCallback | None = None,
) -> list[Contender]:
    """Build every contender from the run in `run_dir`, writing soups into `soups_dir`.

    Paths in the result are relative to `base` (the demo's output folder).
    """
    run = Run(run_dir)
    last = run.latest(kind="train")
    best = run.best(MONITOR, "min")
    ema_best = run.best(EMA_MONITOR, "min")
    if last is None or best is None or ema_best is None:
        raise CheckpointNotFound(
            f"{run.path}: the run has no checkpoint with a finite {MONITOR!r} and {EMA_MONITOR!r}"
        )
    os.makedirs(soups_dir, exist_ok=True)
    k = config.k
    build = model_builder(config, splits)
    # Training batches to re-estimate BatchNorm statistics of soups on (the network has them only
    # in the small-validation-set scenario); the same data the network was trained on.
    size = config.batch_size
    recalibrate = (
        [splits.train.x[i : i + size] for i in range(0, len(splits.train), size)]
        if has_batchnorm(config)
        else None
    )

    def note(label: str) -> None:
        if on_build is not None:
            on_build(label)

    def rel(path: str) -> str:
        return os.path.relpath(path, base)

    def scored(paths: list[str]) -> tuple[Scores, Scores]:
        return (
            score_files(paths, splits.val, build=build),
            score_files(paths, splits.test, build=build),
        )

    def single(key: str, label: str, info: CheckpointInfo, filename: str, kind: str) -> Contender:
        note(label)
        path = info.file(filename)
        val, test = scored([path])
        return Contender(
            key=key,
            label=label,
            kind=kind,
            recipe=None,
            members=[info.name],
            files=[rel(path)],
            forward_passes=1,
            val=val,
            test=test,
        )

    def souped(key: str, label: str, recipe: str, fallback: str | None = None, **kwargs: Any) -> Contender:
        note(label)
        output = os.path.join(soups_dir, f"{key}.safetensors")
        if recalibrate is not None:
            kwargs = {"recalibrate": recalibrate, "model": build, **kwargs}
        details: dict[str, Any] = {}
        try:
            result = soup(run, recipe, output=output, force=True, **kwargs)
        except EmptySelection as exc:
            if fallback is None:
                raise
            # The table needs every row in every seed: say what happened and make the fallback.
            details["fallback"] = f"{exc}; made {fallback} instead"
            result = soup(run, fallback, output=output, force=True, **kwargs)
        assert result.path is not None
        val, test = scored([result.path])
        if result.greedy:
            details["greedy"] = [
                {
                    "name": s.name,
                    "score": s.score,
                    "soup_score": s.soup_score,
                    "accepted": s.accepted,
                    "reason": s.reason,
                }
                for s in result.greedy
            ]
        return Contender(
            key=key,
            label=label,
            kind="soup",
            recipe=result.recipe,
            members=[m.name for m in result.members],
            files=[rel(result.path)],
            forward_passes=1,
            val=val,
            test=test,
            details=details,
        )

    def evaluate(model: nn.Module) -> dict[str, float]:
        return score_model(model, splits.val).as_metrics("val")

    contenders = [
        single("last", "last checkpoint", last, "model.safetensors", "checkpoint"),
        single("best", "best checkpoint", best, "model.safetensors", "checkpoint"),
        single("ema", "EMA at the end", last, "ema.safetensors", "ema"),
        single("ema-best", "EMA at its best", ema_best, "ema.safetensors", "ema"),
        souped("last-k", f"soup: last {k}", f"last:{k}"),
        souped("top-k", f"soup: top {k}", f"top:{k}:{MONITOR}:min"),
        souped("improved", "soup: improved", IMPROVED, fallback=f"{IMPROVED}:warmup=0"),
        souped("greedy", "soup: greedy", GREEDY, evaluate=evaluate, model=build),
    ]
    if config.scenario == "small-val":
        contenders += [
            souped(key, label, recipe, evaluate=lambda model: per_example(model, splits.val), model=build)
            for key, label, recipe in (
                ("greedy-nll", "soup: greedy on NLL", GREEDY_NLL),
                ("greedy-halves", "soup: greedy on halves", GREEDY_HALVES),
            )
        ]
    top = next(c for c in contenders if c.key == "top-k")
    note(f"ensemble of top {k}")
    paths = [run.get(name).file("model.safetensors") for name in top.members]
    val, test = scored(paths)
    contenders.append(
        Contender(
            key="ensemble",
            label=f"ensemble of top {k}",
            kind="ensemble",
            recipe=top.recipe,
            members=list(top.members),
            files=[rel(p) for p in paths],
            forward_passes=len(paths),
            val=val,
            test=test,
        )
    )
    return contenders
