"""The settings of `ladle demo`, validated on creation so a bad value fails before any training."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from ladle.errors import ConfigError

SCENARIOS = ("digits", "small-val")
"""digits: the 1797 bundled 8x8 digits, 10 classes, an MLP (no BatchNorm).
small-val: the 569 rows of breast_cancer, 2 classes, 114 validation rows, an MLP with BatchNorm
and dropout whose soups are recalibrated; adds the greedy soup made for small validation sets."""


@dataclass(kw_only=True, frozen=True)
class DemoConfig:
    """One demo run: data, model, optimisation, EMA and which soups to build.

    The defaults are chosen so that the recipes differ visibly on the bundled
    digits: with a fifth of the training labels flipped, a network that trains
    long enough starts to memorise the wrong labels, so the last checkpoint,
    the best one, and the averages of either end of the run all score
    differently on clean held-out data.
    """

    scenario: str = "digits"
    """Which data and network: "digits" or "small-val" (see `SCENARIOS`)."""
    seed: int = 0
    """Seeds the split, the label noise, the initialisation and the batch order."""
    epochs: int = 30
    """Training epochs; one checkpoint is saved at the end of each."""
    label_noise: float = 0.2
    """Fraction of training labels replaced by a different, random class (validation and test stay clean)."""
    val_fraction: float = 0.2
    """Share of the rows held out for validation (checkpoint selection, greedy soup)."""
    test_fraction: float = 0.2
    """Share held out for the final test table; never seen by any selection."""
    hidden: int = 128
    """Width of the two hidden layers of the MLP."""
    batch_size: int = 32
    """Training batch size."""
    lr: float = 1e-3
    """AdamW learning rate (constant: no schedule hides the overfitting)."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    ema_decay: float = 0.99
    """Decay of the EMA of the weights, updated after every optimizer step."""
    k: int = 5
    """Members of the last-K and top-K soups and of the prediction ensemble."""

    def __post_init__(self) -> None:
        if self.scenario not in SCENARIOS:
            raise ConfigError(f"scenario={self.scenario!r} is not known; use {' or '.join(SCENARIOS)}")
        _whole("seed", self.seed, low=0)
        _whole("epochs", self.epochs, low=1)
        _whole("hidden", self.hidden, low=1)
        _whole("batch_size", self.batch_size, low=1)
        _whole("k", self.k, low=1)
        _fraction("label_noise", self.label_noise, high=1.0, closed=False)
        _fraction("val_fraction", self.val_fraction, high=0.5, closed=False, positive=True)
        _fraction("test_fraction", self.test_fraction, high=0.5, closed=False, positive=True)
        if not (isinstance(self.lr, int | float) and math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"lr={self.lr!r} must be a positive number")
        if not (isinstance(self.weight_decay, int | float) and 0 <= self.weight_decay < math.inf):
            raise ConfigError(f"weight_decay={self.weight_decay!r} must be a number >= 0")
        if not (isinstance(self.ema_decay, int | float) and 0 <= self.ema_decay < 1):
            raise ConfigError(f"ema_decay={self.ema_decay!r} must be in [0, 1)")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON values (stored in results.json and in the run's config)."""
        return asdict(self)

    def with_seed(self, seed: int) -> DemoConfig:
        """The same settings with another seed."""
        return DemoConfig(**{**self.to_dict(), "seed": seed})


def _whole(name: str, value: Any, *, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{name}={value!r} must be a whole number >= {low}")


def _fraction(name: str, value: Any, *, high: float, closed: bool, positive: bool = False) -> None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > 0 if positive else value >= 0) and (value <= high if closed else value < high)
    if not ok:
        low = "0 <" if positive else "0 <="
        raise ConfigError(f"{name}={value!r} must be a fraction with {low} {name} < {high:g}")
