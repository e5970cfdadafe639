"""Soup quality: which recipe beats the best single checkpoint, on small and large validation sets.

Tasks (nothing is downloaded; every split is seeded and stratified, only training labels noisy):
  cancer          scikit-learn's breast_cancer, 569 rows, binary: 341 train (20% labels flipped),
                  114 validation, 114 test: a small validation set
  synthetic       make_classification, 5 classes, 20 features: 2000 train (25% flipped),
                  1000 validation, 1000 test: a large validation set
  synthetic-small the same task with only 150 validation rows (the rest unused)

Per task and seed an MLP with BatchNorm and dropout trains with SGD (momentum, cosine schedule)
under a CheckpointManager that saves every epoch (val_acc, val_nll, val_f1, train_loss
recorded); then every recipe is made with `ladle.soup` from the run's files (BatchNorm
recalibrated on the training data where the recipe says so) and scored on the test split.
A recipe wins/ties/loses against the best checkpoint by validation NLL on the number of test
rows it gets right.

Run:   .venv/bin/python bench/soup_quality.py            # 10 seeds, 50 epochs, every task (a few minutes)
       .venv/bin/python bench/soup_quality.py --quick    # 2 seeds, 8 epochs (what the tests run)
       options: --tasks cancer,synthetic --seeds 10 --epochs 50 --json results.json
Prints one markdown table per task (docs/benchmarks.md, "Soup quality", holds the figures).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

from ladle import CheckpointManager, Run, soup
from ladle.errors import EmptySelection


@dataclass(kw_only=True, frozen=True)
class Task:
    """A classification task with its split sizes and label noise."""

    name: str
    description: str
    noise: float
    """Share of training labels flipped to another class."""
    val_rows: int | None = None
    """Keep only this many validation rows (None: the whole validation split)."""


TASKS = {
    "cancer": Task(name="cancer", description="breast_cancer, 114 validation rows, 20% noise", noise=0.2),
    "synthetic-small": Task(
        name="synthetic-small",
        description="make_classification 5 classes, 150 validation rows, 25% noise",
        noise=0.25,
        val_rows=150,
    ),
    "synthetic": Task(
        name="synthetic",
        description="make_classification 5 classes, 1000 validation rows, 25% noise",
        noise=0.25,
    ),
}


@dataclass(kw_only=True, frozen=True)
class Data:
    """Standardised splits as tensors."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    classes: int


def load_task(task: Task, seed: int) -> Data:
    """The task's splits for one seed (split, noise and subsampling all seeded)."""
    from sklearn.datasets import load_breast_cancer, make_classification
    from sklearn.model_selection import train_test_split

    if task.name == "cancer":
        x, y = load_breast_cancer(return_X_y=True)
        test_size = 0.4
    else:
        x, y = make_classification(
            n_samples=4000, n_features=20, n_informative=10, n_redundant=4, n_classes=5,
            n_clusters_per_class=2, class_sep=1.0, random_state=seed,
        )  # fmt: skip
        test_size = 0.5
    classes = int(y.max()) + 1
    x_train, x_rest, y_train, y_rest = train_test_split(
        x, y, test_size=test_size, stratify=y, random_state=seed
    )
    x_val, x_test, y_val, y_test = train_test_split(
        x_rest, y_rest, test_size=0.5, stratify=y_rest, random_state=seed
    )
    if task.val_rows is not None:
        x_val, _, y_val, _ = train_test_split(
            x_val, y_val, train_size=task.val_rows, stratify=y_val, random_state=seed
        )
    rng = np.random.default_rng(seed)
    flip = rng.choice(len(y_train), size=round(task.noise * len(y_train)), replace=False)
    y_train = y_train.copy()
    y_train[flip] = (y_train[flip] + rng.integers(1, classes, size=len(flip))) % classes
    mean, std = x_train.mean(axis=0), x_train.std(axis=0) + 1e-8

    def tensor(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(((a - mean) / std).astype(np.float32))

    return Data(
        x_train=tensor(x_train), y_train=torch.from_numpy(y_train).long(),
        x_val=tensor(x_val), y_val=torch.from_numpy(y_val).long(),
        x_test=tensor(x_test), y_test=torch.from_numpy(y_test).long(),
        classes=classes,
    )  # fmt: skip


def build_model(features: int, classes: int, hidden: int = 64) -> nn.Sequential:
    """Two hidden layers, each Linear -> BatchNorm -> ReLU -> Dropout(0.2)."""
    return nn.Sequential(
        nn.Linear(features, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Dropout(0.2),
        nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Dropout(0.2),
        nn.Linear(hidden, classes),
    )  # fmt: skip


@torch.no_grad()
def per_example(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row correctness (0/1) and negative log-likelihood, in eval mode."""
    was = model.training
    model.eval()
    log_probs = torch.log_softmax(model(x).double(), dim=1)
    model.train(was)
    return (log_probs.argmax(1) == y).double(), -log_probs.gather(1, y[:, None]).squeeze(1)


def macro_f1(model: nn.Module, x: torch.Tensor, y: torch.Tensor, classes: int) -> float:
    with torch.no_grad():
        model.eval()
        predicted = model(x).argmax(1)
    scores = []
    for c in range(classes):
        tp = int(((predicted == c) & (y == c)).sum())
        wrong = int(((predicted == c) != (y == c)).sum())
        scores.append(2 * tp / (2 * tp + wrong) if tp else 0.0)
    return sum(scores) / classes


def train(data: Data, run_dir: str, seed: int, epochs: int) -> None:
    """SGD with momentum and a cosine schedule; one checkpoint per epoch, every one kept."""
    torch.manual_seed(seed)
    model = build_model(data.x_train.shape[1], data.classes)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    generator = torch.Generator().manual_seed(seed)
    n, batch = len(data.y_train), 32
    step = 0
    with CheckpointManager(
        run_dir, model=model, optimizer=optimizer, scheduler=scheduler, monitor="val_nll", mode="min"
    ) as manager:
        for epoch in range(epochs):
            model.train()
            order = torch.randperm(n, generator=generator)
            losses = []
            for start in range(0, n - batch + 1, batch):  # drop the last partial batch (BatchNorm)
                idx = order[start : start + batch]
                loss = nn.functional.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
                step += 1
            scheduler.step()
            correct, nll = per_example(model, data.x_val, data.y_val)
            manager.epoch_end(
                epoch,
                metrics={
                    "train_loss": statistics.fmean(losses),
                    "val_acc": float(correct.mean()),
                    "val_nll": float(nll.mean()),
                    "val_f1": macro_f1(model, data.x_val, data.y_val, data.classes),
                },
                step=step,
            )


@dataclass(kw_only=True, frozen=True)
class Contender:
    """One final model: a single checkpoint or a recipe, with or without BatchNorm recalibration."""

    key: str
    recipe: str | None
    """The ladle recipe; None for the single checkpoints."""
    recalibrate: bool = True
    """Recalibrate BatchNorm statistics on the training data (soups only)."""


CONTENDERS = [
    Contender(key="last checkpoint", recipe=None),
    Contender(key="best checkpoint", recipe=None),
    Contender(key="last:5", recipe="last:5"),
    Contender(key="top:5:val_nll:min", recipe="top:5:val_nll:min"),
    Contender(key="improved:val_acc:max,val_nll:min", recipe="improved:val_acc:max,val_nll:min"),
    Contender(key="greedy:val_acc:max, no recalibration", recipe="greedy:val_acc:max", recalibrate=False),
    Contender(key="greedy:val_acc:max", recipe="greedy:val_acc:max"),
    Contender(key="greedy:val_acc:max:accept=better", recipe="greedy:val_acc:max:accept=better"),
    Contender(key="greedy:val_nll:min", recipe="greedy:val_nll:min"),
    Contender(key="greedy:val_acc:max:accept=halves", recipe="greedy:val_acc:max:accept=halves"),
    Contender(key="greedy:val_nll:min:accept=halves", recipe="greedy:val_nll:min:accept=halves"),
]
REFERENCE = "best checkpoint"


@dataclass(kw_only=True)
class Outcome:
    """One contender on one seed."""

    key: str
    members: int
    test_correct: int
    test_n: int
    test_nll: float
    val_score: dict[str, float] = field(default_factory=dict)
    """What the soup's evaluate returned (held-out scores from `SoupResult.metrics`)."""


def run_seed(task: Task, seed: int, epochs: int, workdir: str) -> list[Outcome]:
    """Train one run and score every contender on the test split."""
    data = load_task(task, seed)
    run_dir = f"{workdir}/{task.name}-{seed}/run"
    train(data, run_dir, seed, epochs)
    run = Run(run_dir)

    def factory() -> nn.Module:
        return build_model(data.x_train.shape[1], data.classes)

    def evaluate(model: nn.Module) -> dict[str, torch.Tensor]:
        correct, nll = per_example(model, data.x_val, data.y_val)
        return {"val_acc": correct, "val_nll": nll}

    loader = [(data.x_train[i : i + 64], data.y_train[i : i + 64]) for i in range(0, len(data.y_train), 64)]

    def tested(path: str) -> tuple[int, float]:
        model = factory()
        model.load_state_dict(load_file(path))
        correct, nll = per_example(model, data.x_test, data.y_test)
        return int(correct.sum()), float(nll.mean())

    outcomes = []
    for contender in CONTENDERS:
        if contender.recipe is None:
            info = (
                run.latest(kind="train") if contender.key == "last checkpoint" else run.best("val_nll", "min")
            )
            assert info is not None
            correct, nll = tested(info.file("model.safetensors"))
            outcomes.append(
                Outcome(
                    key=contender.key, members=1, test_correct=correct, test_n=len(data.y_test), test_nll=nll
                )
            )
            continue
        output = (
            f"{workdir}/{task.name}-{seed}/{contender.key.replace(':', '_').replace(' ', '')}.safetensors"
        )
        try:
            result = soup(
                run,
                contender.recipe,
                output=output,
                evaluate=evaluate,
                model=factory,
                recalibrate=loader if contender.recalibrate else None,
                force=True,
            )
        except EmptySelection:  # e.g. every improvement lies in improved's warm-up: no soup to score
            outcomes.append(
                Outcome(key=contender.key, members=0, test_correct=0, test_n=0, test_nll=math.nan)
            )
            continue
        assert result.path is not None
        correct, nll = tested(result.path)
        outcomes.append(
            Outcome(
                key=contender.key,
                members=len(result.members),
                test_correct=correct,
                test_n=len(data.y_test),
                test_nll=nll,
                val_score=dict(result.metrics),
            )
        )
    return outcomes


@dataclass(kw_only=True)
class Row:
    """One contender over every seed of a task."""

    key: str
    made: int
    """Seeds where the recipe selected something (the rest are left out of every column)."""
    members_mean: float
    members_min: int
    members_max: int
    acc_mean: float
    acc_std: float
    nll_mean: float
    wins: int
    ties: int
    losses: int


def summarize(per_seed: Sequence[Sequence[Outcome]]) -> list[Row]:
    """Mean test accuracy and NLL, and W/T/L against the best checkpoint, per contender."""
    rows = []
    for contender in CONTENDERS:
        pairs = [
            (next(o for o in seed if o.key == contender.key), next(o for o in seed if o.key == REFERENCE))
            for seed in per_seed
        ]
        pairs = [(o, r) for o, r in pairs if o.members > 0]
        if not pairs:
            rows.append(Row(key=contender.key, made=0, members_mean=0, members_min=0, members_max=0,
                            acc_mean=math.nan, acc_std=math.nan, nll_mean=math.nan, wins=0, ties=0, losses=0))  # fmt: skip
            continue
        mine, refs = [o for o, _ in pairs], [r for _, r in pairs]
        accs = [o.test_correct / o.test_n for o in mine]
        deltas = [o.test_correct - r.test_correct for o, r in zip(mine, refs, strict=True)]
        rows.append(
            Row(
                key=contender.key,
                made=len(mine),
                members_mean=statistics.fmean(o.members for o in mine),
                members_min=min(o.members for o in mine),
                members_max=max(o.members for o in mine),
                acc_mean=statistics.fmean(accs),
                acc_std=statistics.stdev(accs) if len(accs) > 1 else 0.0,
                nll_mean=statistics.fmean(o.test_nll for o in mine),
                wins=sum(d > 0 for d in deltas),
                ties=sum(d == 0 for d in deltas),
                losses=sum(d < 0 for d in deltas),
            )
        )
    return rows


def markdown(task: Task, rows: Sequence[Row], seeds: int, epochs: int, seconds: float) -> str:
    """A markdown table of one task."""
    lines = [
        f"**{task.name}** ({task.description}; {seeds} seeds, {epochs} epochs, {seconds:.0f} s)",
        "",
        "| final model | members (min-max) | test acc % | test NLL | W/T/L vs best | tie or win |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        members = (
            f"{r.members_min}"
            if r.members_min == r.members_max
            else (f"{r.members_mean:.1f} ({r.members_min}-{r.members_max})")
        )
        record = "reference" if r.key == REFERENCE else f"{r.wins}/{r.ties}/{r.losses}"
        tie_or_win = "" if r.key == REFERENCE else f"{r.wins + r.ties}/{seeds}"
        if r.made < seeds:
            members += f"; selects none in {seeds - r.made} seeds"
        lines.append(
            f"| {r.key} | {members} | {100 * r.acc_mean:.2f} ± {100 * r.acc_std:.2f} | {r.nll_mean:.3f} "
            f"| {record} | {tie_or_win} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None, *, write: Callable[[str], None] = print) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", default=",".join(TASKS), help="comma-separated: " + ", ".join(TASKS))
    parser.add_argument("--seeds", type=int, default=None, help="seeds 0..N-1 (default 10; --quick: 2)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs per run (default 50; --quick: 8)")
    parser.add_argument("--quick", action="store_true", help="2 seeds, 8 epochs: checks that it runs")
    parser.add_argument("--json", default=None, help="also write every outcome to this file")
    args = parser.parse_args(argv)
    seeds = args.seeds or (2 if args.quick else 10)
    epochs = args.epochs or (8 if args.quick else 50)
    unknown = [t for t in args.tasks.split(",") if t not in TASKS]
    if unknown:
        parser.error(f"unknown task {', '.join(unknown)}; choose from {', '.join(TASKS)}")
    logging.getLogger("ladle").setLevel(logging.ERROR)  # the per-step greedy log is in the results
    torch.set_num_threads(1)  # tiny networks: one thread is as fast, and fair on a shared machine
    report: dict[str, Any] = {"seeds": seeds, "epochs": epochs, "tasks": {}}
    with tempfile.TemporaryDirectory(prefix="ladle-soup-quality-") as workdir:
        for name in args.tasks.split(","):
            task = TASKS[name]
            started = time.perf_counter()
            per_seed = [run_seed(task, seed, epochs, workdir) for seed in range(seeds)]
            seconds = time.perf_counter() - started
            rows = summarize(per_seed)
            write(markdown(task, rows, seeds, epochs, seconds))
            write("")
            report["tasks"][name] = {
                "rows": [asdict(r) for r in rows],
                "per_seed": [[asdict(o) for o in seed] for seed in per_seed],
                "seconds": round(seconds, 1),
            }
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
