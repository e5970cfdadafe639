"""The demo's network: a small MLP over the 64 pixels of a digit.

No BatchNorm on purpose: averaged weights would need their running
statistics recomputed (see the README's pitfalls), which would blur what
the table compares.
"""

from __future__ import annotations

from torch import nn

from ladle.demo.data import CLASSES, FEATURES


def build_model(hidden: int = 128) -> nn.Sequential:
    """64 -> hidden -> hidden -> 10, ReLU; the same keys for every checkpoint, soup and EMA."""
    return nn.Sequential(
        nn.Linear(FEATURES, hidden),
        nn.ReLU(),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Linear(hidden, CLASSES),
    )
