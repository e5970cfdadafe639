"""Trainer output directories: a transformers Trainer's checkpoints, read without transformers.

A Trainer writes `<output_dir>/checkpoint-<step>/` folders: the model in
`save_pretrained` form (`config.json`, `model.safetensors` or shards, tokenizer
files), the training state (`optimizer.pt`, `scheduler.pt`, `rng_state.pth`,
`training_args.bin`) and `trainer_state.json`, whose `log_history` holds every
logged metric by step. This module reads only those JSON files and folder
names: `trainer_checkpoints` turns the folders into the `CheckpointInfo`
records soup recipes choose from (so `top:5:eval_loss:min` works on a plain
Trainer run), `ladle.store.foreign_runs.TrainerOutput` presents the directory as a read-only
run to `ladle.soup`, `ladle.members` expands it for `ladle avg`, and
`copy_model_files` copies what a soup needs beside its weights to load with
`from_pretrained`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
from collections.abc import Iterable, Mapping
from dataclasses import replace
from typing import Any

from ladle.errors import FormatError, RunNotFound
from ladle.metrics import is_finite_number
from ladle.store.checkpoint import CheckpointInfo, FileRecord
from ladle.store.paths import locate
from ladle.store.storage import Storage, storage_for

log = logging.getLogger("ladle")

TRAINER_STATE = "trainer_state.json"
CHECKPOINT_PREFIX = "checkpoint-"
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
WEIGHT_FILE_RE = re.compile(
    r"^(model|pytorch_model|adapter_model|tf_model|flax_model)(-\d+-of-\d+)?\.(safetensors|bin|h5|msgpack)"
    r"(\.index\.json)?$"
)
"""Model weights in transformers' names: a soup writes its own, so these are never copied."""
TRAINING_FILES = frozenset(
    {
        TRAINER_STATE,
        "training_args.bin",
        "optimizer.pt",
        "optimizer.bin",
        "scheduler.pt",
        "scaler.pt",
        "meta.json",
    }
)
"""Training state, only meaningful to resume the run it came from."""
_RNG_RE = re.compile(r"^rng_state(_\d+)?\.pth$")
# Bookkeeping entries of log_history that are not metrics of the model; speeds
# (`eval_runtime`, `train_samples_per_second`) describe the machine, not the model.
_NOT_METRICS = frozenset({"step", "epoch", "total_flos", "num_input_tokens_seen"})
_SPEED_SUFFIXES = ("_runtime", "_per_second")


def checkpoint_step(name: str) -> int | None:
    """The step in a Trainer checkpoint folder name (`checkpoint-500` -> 500), else None."""
    match = _CHECKPOINT_RE.match(name)
    return int(match.group(1)) if match else None


def read_trainer_state(folder: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The parsed `trainer_state.json` of a checkpoint folder (path or URL); None when absent or
    unreadable."""
    storage, where = locate(folder)
    path = storage.join(where, TRAINER_STATE)
    try:
        state = json.loads(storage.read_bytes(path).decode("utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("%s: unreadable (%s); its checkpoint has no metrics", path, exc)
        return None
    return state if isinstance(state, dict) else None


def metrics_at(log_history: Iterable[Mapping[str, Any]], step: int) -> dict[str, float]:
    """Every numeric metric logged at `step`: training logs and evaluations merged (later wins),
    without bookkeeping (`epoch`, `total_flos`) and speeds (`eval_runtime`, `*_per_second`)."""
    merged: dict[str, float] = {}
    for entry in log_history:
        if not isinstance(entry, Mapping) or entry.get("step") != step:
            continue
        for key, value in entry.items():
            if key in _NOT_METRICS or key.endswith(_SPEED_SUFFIXES):
                continue
            if isinstance(value, bool) or not isinstance(value, int | float):
                continue
            merged[str(key)] = value
    return merged


def epoch_index(epoch: Any) -> int | None:
    """The 0-based epoch a Trainer's fractional epoch falls in (1.0, the end of the first, is 0)."""
    if not is_finite_number(epoch) or float(epoch) < 0:
        return None
    return max(math.ceil(float(epoch)) - 1, 0)


def is_trainer_output(path: str | os.PathLike[str]) -> bool:
    """True for a folder (path or URL) holding Trainer `checkpoint-<step>/` folders with a
    `trainer_state.json`."""
    try:
        storage, where = locate(path)
        return storage.isdir(where) and holds_trainer_checkpoints(storage, where, storage.listdir(where))
    except OSError:
        return False


def holds_trainer_checkpoints(storage: Storage, folder: str, names: list[str]) -> bool:
    """Whether the folder listing `names` holds a `checkpoint-<step>/` with a `trainer_state.json`."""
    return any(
        checkpoint_step(name) is not None and storage.isfile(storage.join(folder, name, TRAINER_STATE))
        for name in names
    )


def has_weights(folder: str | os.PathLike[str]) -> bool:
    """Whether a folder (path or URL) holds model weights under one of transformers' file names."""
    storage, where = locate(folder)
    return any(WEIGHT_FILE_RE.match(name) for name in storage.listdir(where))


def _checkpoint_files(storage: Storage, root: str) -> dict[str, dict[str, FileRecord]]:
    """The files directly inside each `checkpoint-<step>/` folder of `root`, with their sizes (one
    listing of the whole folder, which on a store is one request). The Trainer records no
    checksums, so sha256 is empty."""
    found: dict[str, dict[str, FileRecord]] = {}
    for relative, size in storage.file_sizes(root).items():
        folder, _, name = relative.replace(os.sep, "/").partition("/")
        if checkpoint_step(folder) is None or not name or "/" in name:
            continue
        found.setdefault(folder, {})[name] = FileRecord(size=size, sha256="")
    return found


def trainer_checkpoints(output_dir: str | os.PathLike[str]) -> list[CheckpointInfo]:
    """The checkpoints of a Trainer output directory (path or URL), oldest first, with the
    metrics of their step.

    Metrics come from each checkpoint's own `trainer_state.json` (the Trainer
    evaluates before it saves, so an evaluation at a checkpoint's step is in its
    log). Folders without weights or without a readable state are skipped with
    a warning: the Trainer may have been interrupted while writing them.
    """
    storage, root = storage_for(output_dir)
    if not storage.isdir(root):
        raise RunNotFound(f"{root}: no such directory; pass the Trainer's output_dir")
    listed = _checkpoint_files(storage, root)
    for name in storage.listdir(root):
        folder = storage.join(root, name)
        if checkpoint_step(name) is not None and name not in listed and storage.isdir(folder):
            listed[name] = {}  # an empty folder (a save that had just begun): warned about below
    found: list[CheckpointInfo] = []
    for name, files in sorted(listed.items()):
        named_step = checkpoint_step(name)
        assert named_step is not None
        folder = storage.join(root, name)
        state = read_trainer_state(folder) if TRAINER_STATE in files else None
        if state is None or not any(WEIGHT_FILE_RE.match(n) for n in files):
            log.warning("%s: no %s or no model weights; skipped (an unfinished save?)", folder, TRAINER_STATE)
            continue
        step = state.get("global_step", named_step)
        step = step if isinstance(step, int) and not isinstance(step, bool) else named_step
        found.append(
            CheckpointInfo(
                name=name,
                path=folder,
                step=step,
                epoch=epoch_index(state.get("epoch")),
                time=storage.mtime(storage.join(folder, TRAINER_STATE)),
                metrics=metrics_at(state.get("log_history") or [], step),
                files=files,
                kind="train",
                extra={"epoch_float": state.get("epoch"), "framework": "transformers"},
            )
        )
    if not found:
        raise FormatError(
            f"{root}: no Trainer checkpoints (checkpoint-<step>/ folders with {TRAINER_STATE} and "
            "model weights); is it the Trainer's output_dir?"
        )
    found.sort(key=lambda c: (c.step, c.name))
    return [replace(c, seq=i + 1) for i, c in enumerate(found)]


def is_model_file(name: str) -> bool:
    """Whether a file of a checkpoint folder belongs beside a soup's weights (config, tokenizer, code)."""
    if name.startswith(".") or name in TRAINING_FILES or _RNG_RE.match(name) or WEIGHT_FILE_RE.match(name):
        return False
    return not name.endswith((".safetensors.json", ".bin.json", ".pt", ".pth"))


def copy_model_files(source: str | os.PathLike[str], destination: str | os.PathLike[str]) -> list[str]:
    """Copy config, generation config, tokenizer and processor files (everything but weights and
    training state) from a checkpoint folder (path or URL) into the local folder `destination`;
    returns the names copied."""
    storage, src = locate(source)
    dst = os.fspath(destination)
    os.makedirs(dst, exist_ok=True)
    copied = []
    names = [n for n in storage.file_sizes(src) if "/" not in n.replace(os.sep, "/")]
    for name in names:
        if not is_model_file(name):
            continue
        target = os.path.join(dst, name)
        with storage.open(storage.join(src, name), "rb") as read, open(target, "wb") as write:
            shutil.copyfileobj(read, write, 1 << 20)
        copied.append(name)
    if "config.json" not in copied:
        log.warning("%s has no config.json: from_pretrained cannot load %s without one", src, dst)
    return copied


__all__ = [
    "CHECKPOINT_PREFIX",
    "TRAINER_STATE",
    "TRAINING_FILES",
    "WEIGHT_FILE_RE",
    "checkpoint_step",
    "copy_model_files",
    "epoch_index",
    "has_weights",
    "holds_trainer_checkpoints",
    "is_model_file",
    "is_trainer_output",
    "metrics_at",
    "read_trainer_state",
    "trainer_checkpoints",
]
