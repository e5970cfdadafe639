"""Scoring the demo's models on a split: accuracy, macro-F1 and negative log-likelihood.

A model, a soup and the EMA are one network (one forward pass); an ensemble
averages the predicted probabilities of several networks (one pass each). All
of them are scored from weight files on disk, so the numbers in the table are
those of the files the demo wrote.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

from ladle.demo.data import CLASSES, Split
from ladle.demo.model import build_model


@dataclass(kw_only=True, frozen=True)
class Scores:
    """What a model achieves on one split."""

    acc: float
    """Accuracy: share of examples whose most likely class is right."""
    f1: float
    """Macro-F1: the mean over classes of F1 (a class never predicted scores 0)."""
    nll: float
    """Mean negative log-likelihood of the true class (natural log); lower is better."""
    correct: int
    """Examples classified correctly (accuracy times the split size, exactly)."""
    n: int
    """Examples scored."""

    def as_metrics(self, prefix: str) -> dict[str, float]:
        """`{prefix_acc, prefix_f1, prefix_nll}` as the manager records them."""
        return {f"{prefix}_acc": self.acc, f"{prefix}_f1": self.f1, f"{prefix}_nll": self.nll}

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


def macro_f1(predicted: torch.Tensor, labels: torch.Tensor, classes: int = CLASSES) -> float:
    """Macro-averaged F1, as scikit-learn's `f1_score(average="macro", zero_division=0)`."""
    scores = []
    for c in range(classes):
        tp = int(((predicted == c) & (labels == c)).sum())
        fp = int(((predicted == c) & (labels != c)).sum())
        fn = int(((predicted != c) & (labels == c)).sum())
        scores.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return sum(scores) / classes


def score_log_probs(log_probs: torch.Tensor, labels: torch.Tensor) -> Scores:
    """Scores from per-class log-probabilities, shape (n, classes)."""
    predicted = log_probs.argmax(dim=1)
    correct = int((predicted == labels).sum())
    nll = float(-log_probs.gather(1, labels[:, None]).mean())
    n = int(labels.shape[0])
    f1 = macro_f1(predicted, labels, classes=int(log_probs.shape[1]))
    return Scores(acc=correct / n, f1=f1, nll=nll, correct=correct, n=n)


def per_example(model: nn.Module, split: Split) -> dict[str, torch.Tensor]:
    """Per-example correctness (0/1) and NLL: what the greedy rule `accept=halves` compares."""
    log_probs = log_probs_of(model, split.x)
    return {
        "val_acc": (log_probs.argmax(dim=1) == split.y).double(),
        "val_nll": -log_probs.gather(1, split.y[:, None]).squeeze(1),
    }


@torch.no_grad()
def log_probs_of(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The model's log-probabilities in eval mode (the model's own mode is restored)."""
    was_training = model.training
    model.eval()
    try:
        return torch.log_softmax(model(x).double(), dim=1)
    finally:
        model.train(was_training)


def score_model(model: nn.Module, split: Split) -> Scores:
    """A model's scores on a split."""
    return score_log_probs(log_probs_of(model, split.x), split.y)


def model_from_weights(
    weights: Mapping[str, torch.Tensor], hidden: int, build: Callable[[], nn.Module] | None = None
) -> nn.Module:
    """The demo network (`build()`, or the digits MLP of width `hidden`) with these weights."""
    model = build() if build is not None else build_model(hidden)
    model.load_state_dict(dict(weights), strict=True)
    return model


def read_weights(path: str) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file."""
    from safetensors.torch import load_file

    return load_file(path)


def score_files(
    paths: Sequence[str], split: Split, *, hidden: int = 128, build: Callable[[], nn.Module] | None = None
) -> Scores:
    """Scores of one weights file, or of the prediction ensemble of several (mean probability)."""
    if not paths:
        raise ValueError("score_files needs at least one weights file")
    per_model = [log_probs_of(model_from_weights(read_weights(p), hidden, build), split.x) for p in paths]
    # log(mean(p_i)) computed in log space: stable however small the probabilities get.
    combined = torch.logsumexp(torch.stack(per_model), dim=0) - math.log(len(per_model))
    return score_log_probs(combined, split.y)
