"""The demo's networks: small MLPs.

The digits network has no BatchNorm on purpose: averaged weights would need
their running statistics recomputed, which would blur what the table
compares. The small-validation-set scenario has BatchNorm and dropout, as
many real networks do: there every soup is recalibrated (`recalibrate=`).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from ladle.demo.config import DemoConfig
from ladle.demo.data import CLASSES, FEATURES, Splits


def build_model(
    hidden: int = 128, *, features: int = FEATURES, classes: int = CLASSES, batchnorm: bool = False
) -> nn.Sequential:
    """features -> hidden -> hidden -> classes, ReLU (with BatchNorm and Dropout(0.2) when asked);
    the same keys for every checkpoint, soup and EMA."""
    if not batchnorm:
        return nn.Sequential(
            nn.Linear(features, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, classes),
        )
    return nn.Sequential(
        nn.Linear(features, hidden),
        nn.BatchNorm1d(hidden),
        nn.ReLU(),
        nn.Dropout(0.2),
        nn.Linear(hidden, hidden),
        nn.BatchNorm1d(hidden),
        nn.ReLU(),
        nn.Dropout(0.2),
        nn.Linear(hidden, classes),
    )


def has_batchnorm(config: DemoConfig) -> bool:
    """Whether the scenario's network has BatchNorm (its soups are then recalibrated)."""
    return config.scenario == "small-val"


def model_builder(config: DemoConfig, splits: Splits) -> Callable[[], nn.Sequential]:
    """A factory of the scenario's network, sized for its data."""

    def build() -> nn.Sequential:
        return build_model(
            config.hidden, features=splits.features, classes=splits.classes, batchnorm=has_batchnorm(config)
        )

    return build
