"""Checkpoints as other tools write them, rebuilt here (nothing is downloaded).

Each builder reproduces the file structure of the real tool with tiny tensors:
- timm `CheckpointSaver`: `{"epoch", "arch", "state_dict", "state_dict_ema",
  "optimizer", "version": 2, "args": argparse.Namespace, "metric"}` in
  `checkpoint-<epoch>.pth.tar`, `last.pth.tar` and `model_best.pth.tar`
  (hard links, as timm makes them), and `summary.csv` with one row per epoch;
- fairseq: `{"args": Namespace | None, "cfg": dict, "model", "criterion",
  "optimizer_history": [{..., "num_updates"}], "task_state", "extra_state":
  {"train_iterator": {...}, "val_loss", ...}, "last_optimizer_state"}`.
"""

from __future__ import annotations

import argparse
import csv
import os
from pathlib import Path

import torch
from torch import nn

TIMM_EVAL_TOP1 = {0: 40.0, 1: 55.0, 2: 61.0, 3: 58.0, 4: 60.0}


def timm_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3))


def timm_args() -> argparse.Namespace:
    return argparse.Namespace(
        model="resnet18",
        lr=0.1,
        epochs=5,
        eval_metric="top1",
        model_ema=True,
        output=Path("/tmp/timm-out"),
        aa=None,
        mean=(0.485, 0.456, 0.406),
    )


def timm_checkpoint(path: Path, epoch: int, *, seed: int | None = None, metric: float = 0.0) -> dict:
    """One file as timm's `CheckpointSaver._save` writes it; returns what was saved."""
    model = timm_model(epoch if seed is None else seed)
    ema = timm_model(100 + epoch)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 4)).sum().backward()
    optimizer.step()
    state = {
        "epoch": epoch,
        "arch": "resnet18",
        "state_dict": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "version": 2,
        "args": timm_args(),
        "state_dict_ema": ema.state_dict(),
        "metric": metric,
    }
    torch.save(state, path)
    return state


def timm_output(root: Path, epochs: dict[int, float] | None = None, *, keep: int = 3) -> Path:
    """A timm train.py output folder: summary.csv, the `keep` best numbered checkpoints by
    eval_top1 (timm's checkpoint_hist), last.pth.tar and model_best.pth.tar."""
    epochs = TIMM_EVAL_TOP1 if epochs is None else epochs
    root.mkdir(parents=True, exist_ok=True)
    (root / "args.yaml").write_text("model: resnet18\nlr: 0.1\n")
    with open(root / "summary.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["epoch", "train_loss", "eval_loss", "eval_top1", "eval_top5", "lr"])
        for epoch, top1 in epochs.items():
            writer.writerow([epoch, 2.0 - epoch / 10, 1.5 - top1 / 100, top1, top1 + 20, 0.1])
    best = sorted(epochs, key=lambda e: -epochs[e])[:keep]
    for epoch, top1 in epochs.items():
        # timm writes a temporary file and renames it over last.pth.tar (a new inode each time).
        last, tmp = root / "last.pth.tar", root / "tmp.pth.tar"
        timm_checkpoint(tmp, epoch, metric=top1)
        os.replace(tmp, last)
        if epoch in best:
            numbered = root / f"checkpoint-{epoch}.pth.tar"
            if numbered.exists():
                numbered.unlink()
            os.link(last, numbered)
        # Older numbered files that fell out of the top `keep` are deleted, as timm does.
        for stale in root.glob("checkpoint-*.pth.tar"):
            if int(stale.name.split("-")[1].split(".")[0]) not in best:
                stale.unlink()
    top = max(epochs, key=lambda e: epochs[e])
    os.link(root / f"checkpoint-{top}.pth.tar", root / "model_best.pth.tar")
    return root


def fairseq_checkpoint(path: Path, updates: int, *, legacy: bool = True, seed: int = 0) -> dict:
    """A fairseq `checkpoint_utils.save_state` dict (legacy: `args` Namespace; new: `cfg` dict)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10))
    args = argparse.Namespace(arch="transformer", lr=[0.0005], max_tokens=4096, seed=1)
    state = {
        "args": args if legacy else None,
        "cfg": None if legacy else {"model": {"_name": "transformer"}, "optimization": {"lr": [0.0005]}},
        "model": model.state_dict(),
        "criterion": None,
        "optimizer_history": [
            {
                "criterion_name": "LabelSmoothedCrossEntropyCriterion",
                "optimizer_name": "FairseqAdam",
                "lr_scheduler_state": {"best": 3.2},
                "num_updates": updates,
            }
        ],
        "task_state": {},
        "extra_state": {
            "metrics": {},
            "previous_training_time": 12.5,
            "train_iterator": {"epoch": 2, "iterations_in_epoch": 7, "shuffle": True},
            "val_loss": 3.2,
            "best": 3.1,
        },
        "last_optimizer_state": {"state": {}, "param_groups": [{"lr": 0.0005, "params": [0, 1, 2]}]},
    }
    torch.save(state, path)
    return state


class Evil:
    """A pickle that runs code when loaded: writes `marker` through `exec`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (exec, (f"import pathlib; pathlib.Path({str(self.marker)!r}).write_text('pwned')",))


def evil_checkpoint(path: Path, marker: Path, *, seed: int = 0) -> Path:
    """A timm-like training checkpoint that also holds an object whose unpickling runs code."""
    model = timm_model(seed)
    torch.save({"epoch": 0, "state_dict": model.state_dict(), "args": Evil(marker)}, path)
    return path
