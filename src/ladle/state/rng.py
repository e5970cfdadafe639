"""Capture and restore every random number generator a training loop draws from.

Python's `random`, NumPy's legacy global generator, torch's CPU generator and the
generator of every CUDA device. Values are converted to plain types and tensors so
the state file loads with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import logging
import random
from typing import Any

import numpy as np
import torch

log = logging.getLogger("ladle")


def capture_rng() -> dict[str, Any]:
    """A weights-only-loadable snapshot of every global RNG."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": {"version": version, "state": list(internal), "gauss": gauss},
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [s.cpu() for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Put every RNG back to a captured snapshot; CUDA states are matched by device index."""
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state(
        (
            npy["kind"],
            npy["keys"].numpy().astype(np.uint32),
            npy["pos"],
            npy["has_gauss"],
            npy["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available():
        count = torch.cuda.device_count()
        if count != len(cuda):
            log.warning(
                "the checkpoint holds RNG states of %d CUDA devices but %d are visible; "
                "restoring the first %d",
                len(cuda),
                count,
                min(count, len(cuda)),
            )
        for index, device_state in enumerate(cuda[:count]):
            torch.cuda.set_rng_state(device_state, device=index)
    elif cuda:
        log.warning("the checkpoint holds CUDA RNG states but no CUDA device is visible; skipped")
