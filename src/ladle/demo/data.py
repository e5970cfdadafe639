"""The demo's data: scikit-learn's bundled 8x8 digits or breast_cancer (no download), split and made noisy.

The split is stratified and seeded, so the same seed gives the same three
sets anywhere. Only training labels are flipped (`label_noise`); validation
and test labels stay clean, as they would in a careful project. Features are
scaled with statistics of the training split alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ladle.errors import MissingDependency

CLASSES = 10
FEATURES = 64


@dataclass(kw_only=True, frozen=True)
class Split:
    """Inputs and labels of one split, as tensors."""

    x: torch.Tensor
    """float32 features, shape (n, 64), standardised with the training statistics."""
    y: torch.Tensor
    """int64 class labels, shape (n,)."""

    def __len__(self) -> int:
        return int(self.y.shape[0])


@dataclass(kw_only=True, frozen=True)
class Splits:
    """Train (with noisy labels), validation and test splits of the digits."""

    train: Split
    """What the network is fitted on; a `label_noise` share of its labels are wrong."""
    val: Split
    """Clean labels; chooses checkpoints and runs the greedy soup."""
    test: Split
    """Clean labels; only the final table looks at it."""
    flipped: int
    """How many training labels were flipped."""
    classes: int = CLASSES
    """Number of classes."""
    features: int = FEATURES
    """Input features per example."""


def _load(scenario: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_breast_cancer, load_digits
    except ImportError:
        raise MissingDependency(
            "the demo needs scikit-learn (its bundled data sets): pip install 'ladle[demo]'"
        ) from None
    load = load_breast_cancer if scenario == "small-val" else load_digits
    x, y = load(return_X_y=True)
    return x.astype(np.float64), y.astype(np.int64)


def flip_labels(
    labels: np.ndarray, rate: float, rng: np.random.Generator, classes: int = CLASSES
) -> tuple[np.ndarray, int]:
    """A copy of `labels` with a `rate` share replaced by a different class, chosen uniformly."""
    noisy = labels.copy()
    count = round(rate * len(labels))
    chosen = rng.choice(len(labels), size=count, replace=False)
    # Adding 1..classes-1 modulo classes always lands on another class, each with equal chance.
    noisy[chosen] = (noisy[chosen] + rng.integers(1, classes, size=count)) % classes
    return noisy, count


def load_splits(
    *,
    seed: int,
    label_noise: float,
    val_fraction: float = 0.2,
    test_fraction: float = 0.2,
    scenario: str = "digits",
) -> Splits:
    """The scenario's data split into train/val/test (stratified by class), seeded by `seed`."""
    from sklearn.model_selection import train_test_split

    x, y = _load(scenario)
    classes = int(y.max()) + 1
    held_out = val_fraction + test_fraction
    x_train, x_rest, y_train, y_rest = train_test_split(
        x, y, test_size=held_out, stratify=y, random_state=seed
    )
    x_val, x_test, y_val, y_test = train_test_split(
        x_rest, y_rest, test_size=test_fraction / held_out, stratify=y_rest, random_state=seed
    )
    rng = np.random.default_rng(seed)
    y_noisy, flipped = flip_labels(y_train, label_noise, rng, classes)
    mean = x_train.mean(axis=0)
    # Some border pixels of the digits are (nearly) always blank: a floor on the spread keeps them
    # finite. breast_cancer's features have scales from 1e-3 to 1e3: each gets its own spread.
    spread = x_train.std(axis=0)
    scale = np.maximum(spread, 1.0) if scenario == "digits" else np.maximum(spread, 1e-8)

    def split(features: np.ndarray, labels: np.ndarray) -> Split:
        scaled = (features - mean) / scale
        return Split(
            x=torch.from_numpy(scaled.astype(np.float32)), y=torch.from_numpy(labels.astype(np.int64))
        )

    return Splits(
        train=split(x_train, y_noisy),
        val=split(x_val, y_val),
        test=split(x_test, y_test),
        flipped=flipped,
        classes=classes,
        features=int(x.shape[1]),
    )
