"""What `LadleCheckpoint` asks of Lightning: its import names, the trainer's loop state, the
strategy, and Lightning's own checkpoint file.

Several of these answers come from Lightning internals (the fit loop's private
validation decision, `epoch_loop.done`); each question is asked here, in one place, and
falls back to "save now" when a Lightning version no longer answers it. The callback
itself (when to save, what to commit, resume, soups) is `ladle.integrations.lightning`.
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Mapping
from typing import Any

import torch

from ladle.errors import ConfigError
from ladle.integrations._extras import import_first

log = logging.getLogger("ladle")


def checkpoint_bases() -> tuple[type, ...]:
    """Lightning's `Checkpoint` class of every installed import name.

    `lightning.pytorch` and `pytorch_lightning` are two copies of one library whose
    Trainers only recognize their own classes; subclassing both lets one callback
    serve whichever Trainer the user has.
    """
    first = import_first(
        ("lightning.pytorch", "pytorch_lightning"),
        extra="lightning",
        purpose="ladle.integrations.lightning",
    )
    bases = [first.callbacks.Checkpoint]
    other = "pytorch_lightning" if first.__name__.startswith("lightning") else "lightning.pytorch"
    try:
        bases.append(importlib.import_module(other).callbacks.Checkpoint)
    except ImportError:
        pass
    except Exception as exc:  # a broken second copy must not break the working one
        log.debug("not supporting %s Trainers: %s", other, exc)
    return tuple(bases)


def is_fitting(trainer: Any) -> bool:
    fn = getattr(trainer.state, "fn", None)
    return getattr(fn, "value", fn) == "fit" and not trainer.sanity_checking


def validation_follows(trainer: Any) -> bool:
    """Whether Lightning runs validation right after the batch that just ended.

    Asked of Lightning's own (private) decision, so that a save due at this step
    waits for the validation and records its metrics instead of being written
    twice. Time-based validation cannot be predicted: then, and whenever the
    question cannot be asked, the answer is no (save now; a later validation at
    the same step re-saves with the new metrics).
    """
    loop = getattr(trainer.fit_loop, "epoch_loop", None)
    check = getattr(loop, "_should_check_val_fx", None)
    fetcher = getattr(trainer.fit_loop, "_data_fetcher", None)
    if check is None or fetcher is None or getattr(trainer, "_val_check_time_interval", None) is not None:
        return False
    if getattr(loop, "_skip_next_val", False):
        return False
    try:
        return bool(check(fetcher))
    except Exception:  # an internal API that changed: fall back to saving at once
        return False


def epoch_ends(trainer: Any) -> bool:
    """Whether the training epoch ends after the current batch (so `on_train_epoch_end` follows)."""
    loop = getattr(trainer.fit_loop, "epoch_loop", None)
    try:
        return bool(loop is not None and loop.done)
    except Exception:  # an internal API that changed: fall back to saving at once
        return False


def scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
    out = {}
    for key, value in metrics.items():
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                continue
            value = value.item()
        if isinstance(value, int | float) and not isinstance(value, bool):
            out[key] = float(value)
    return out


def warn_if_order_is_lost(trainer: Any) -> None:
    """Name the fix when a resumed fit shuffles with a loader whose order Lightning cannot restore."""
    loaders = getattr(trainer, "train_dataloader", None)
    if isinstance(loaders, Mapping):
        loaders = list(loaders.values())
    for loader in loaders if isinstance(loaders, list | tuple) else [loaders]:
        sampler = getattr(loader, "sampler", None)
        if isinstance(sampler, torch.utils.data.RandomSampler) and not hasattr(loader, "load_state_dict"):
            log.warning(
                "the train DataLoader shuffles with a RandomSampler, whose order Lightning does not restore, "
                "so the resumed epoch sees other batches; for an exact resume use "
                "ladle.ResumableDataLoader(dataset, batch_size=..., shuffle=True, seed=...)"
            )
            return


def check_strategy(strategy: Any) -> None:
    """Refuse, before training, strategies whose checkpoint is a folder of shards."""
    name = type(strategy).__name__
    sharded = (
        name == "DeepSpeedStrategy"
        or (name == "FSDPStrategy" and getattr(strategy, "_state_dict_type", "full") == "sharded")
        or (name == "ModelParallelStrategy" and getattr(strategy, "_save_distributed_checkpoint", True))
    )
    if sharded:
        raise ConfigError(
            f"{name} saves sharded checkpoints (a folder per save), which LadleCheckpoint cannot commit; "
            "use DDP, or FSDP with state_dict_type='full'"
        )


def save_lightning(trainer: Any, path: str, checkpoint: dict[str, Any] | None = None) -> None:
    """Lightning's checkpoint file at `path`: built now, or `checkpoint`, built at an asynchronous save."""
    if checkpoint is None:
        trainer.save_checkpoint(path, weights_only=False)
    else:
        trainer.strategy.save_checkpoint(checkpoint, path)
    if os.path.isdir(path):
        raise ConfigError(
            f"{path}: the strategy saved a sharded checkpoint (a folder); LadleCheckpoint needs one "
            "file: use a strategy that saves a full state dict (e.g. FSDP state_dict_type='full')"
        )
