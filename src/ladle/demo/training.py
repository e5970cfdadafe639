"""Training the demo network with a CheckpointManager: one checkpoint per epoch, EMA on.

The loop is the plain loop of the README with more bookkeeping: per step it
records the training loss, per epoch the training and validation metrics of
the raw weights and of the EMA weights. Every epoch's checkpoint is kept
(no retention policy), so each soup recipe can choose from the whole run.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from ladle.averaging.ema import EMA
from ladle.demo.config import DemoConfig
from ladle.demo.data import Splits
from ladle.demo.evaluation import score_model
from ladle.demo.model import model_builder
from ladle.saving.manager import CheckpointManager
from ladle.state.sampler import ResumableDataLoader

MONITOR = "val_nll"
"""The metric that picks the best checkpoint (and the top-K soup): validation NLL, lower is better."""

EMA_MONITOR = "val_ema_nll"
"""The same for the EMA weights, which are scored on validation data at every epoch too."""

EpochCallback = Callable[[int, Mapping[str, float]], None]
"""Called after each epoch's checkpoint with (epochs done, that epoch's metrics)."""


@dataclass(kw_only=True, frozen=True)
class TrainedRun:
    """Where the run went and how long it took."""

    path: str
    """The run directory (one checkpoint per epoch)."""
    steps: int
    """Optimizer steps taken."""
    checkpoints: int
    """Checkpoints committed."""
    seconds: float
    """Wall time of training, saving included."""


def train(
    config: DemoConfig, splits: Splits, run_dir: str, *, on_epoch: EpochCallback | None = None
) -> TrainedRun:
    """Train from scratch into `run_dir` (which must not hold a run yet); seeded by `config.seed`."""
    started = time.perf_counter()
    torch.manual_seed(config.seed)
    model = model_builder(config, splits)()
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    ema = EMA(model, decay=config.ema_decay)
    dataset = torch.utils.data.TensorDataset(splits.train.x, splits.train.y)
    loader = ResumableDataLoader(dataset, batch_size=config.batch_size, shuffle=True, seed=config.seed)
    step = 0
    with CheckpointManager(
        run_dir,
        model=model,
        optimizer=optimizer,
        ema=ema,
        data=loader,
        monitor=MONITOR,
        mode="min",
        every_epochs=1,
        config=config.to_dict(),
    ) as manager:
        for epoch in range(config.epochs):
            loss_sum, correct, seen = 0.0, 0, 0
            model.train()
            for inputs, labels in loader:
                logits = model(inputs)
                loss = nn.functional.cross_entropy(logits, labels)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                ema.update()
                step += 1
                loss_sum += loss.item() * len(labels)
                correct += int((logits.argmax(dim=1) == labels).sum())
                seen += len(labels)
                manager.step(step, epoch=epoch, metrics={"train_nll": loss.item()})
            metrics = {"train_nll": loss_sum / seen, "train_acc": correct / seen}
            metrics.update(score_model(model, splits.val).as_metrics("val"))
            with ema.applied(model):
                metrics.update(score_model(model, splits.val).as_metrics("val_ema"))
            manager.epoch_end(epoch, metrics=metrics)
            if on_epoch is not None:
                on_epoch(epoch + 1, metrics)
        checkpoints = len(manager.run.checkpoints(kind="train"))
    return TrainedRun(
        path=manager.run.path, steps=step, checkpoints=checkpoints, seconds=time.perf_counter() - started
    )
