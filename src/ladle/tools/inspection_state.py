"""The training state `ladle inspect` lists beside the weights, for each checkpoint layout.

A ladle checkpoint (weight files, DCP groups of a sharded one, its `state.pt`), a torch
training pickle, and a transformers Trainer folder (optimizer.pt, scheduler.pt,
rng_state*.pth, trainer_state.json). Entries are classified and summarized by
`ladle.state.contents`; nothing from a file runs unless the user passes `--trust`.
A ladle checkpoint is described from headers and its `state.pt`'s pickle scan, without
importing torch; foreign pickles are loaded with torch's weights-only loader.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
from typing import Any

from ladle.errors import CorruptCheckpoint, FormatError, UnsafeLoad
from ladle.formats.load import load_source
from ladle.state.contents import (
    StateItem,
    StateKind,
    count_tensors,
    describe_ladle_state,
    describe_training_dict,
    format_count,
    summarize,
)
from ladle.state.pickle_scan import scan_pickle
from ladle.store.checkpoint import CheckpointInfo
from ladle.store.paths import local_copy

log = logging.getLogger("ladle")

PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".tar", ".pkl", ".pickle")
# Files of a transformers Trainer checkpoint folder and what they hold.
_TRAINER_FILES = {
    "optimizer": StateKind.OPTIMIZER,
    "scheduler": StateKind.SCHEDULER,
    "scaler": StateKind.GRAD_SCALER,
    "rng_state": StateKind.RNG,
    "training_args": StateKind.CONFIG,
}


def ladle_state_items(path: str, info: CheckpointInfo) -> list[StateItem]:
    """What a ladle checkpoint holds: its weight files, a sharded checkpoint's DCP groups and
    per-rank files, and the entries of its `state.pt`."""
    items: list[StateItem] = []
    for filename in sorted(info.files):
        if filename.endswith(".safetensors"):
            items.append(_weights_file_item(path, filename))
    if ".metadata" in info.files:
        items.extend(_sharded_items(path, info))
    if "state.pt" in info.files:
        state_path = os.path.join(path, "state.pt")
        try:
            # Its structure is all inspect shows: replayed with stand-ins (`scan_pickle`),
            # nothing runs and no tensor is read, so torch need not be imported.
            with local_copy(state_path) as local:
                state = scan_pickle(local).obj
        except (OSError, FormatError) as exc:
            first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
            raise CorruptCheckpoint(
                f"{state_path}: cannot be read ({first}); run `ladle verify` on the run"
            ) from None
        if isinstance(state, dict):
            items.extend(describe_ladle_state(state))
    return items


def _sharded_items(path: str, info: CheckpointInfo) -> list[StateItem]:
    """A sharded checkpoint's DCP entries (models, optimizers) and its per-rank files."""
    from ladle.formats.dcp import group_sizes

    models = set(info.extra.get("models") or [])
    items = []
    for group, (count, nbytes) in sorted(group_sizes(path).items()):
        kind = StateKind.WEIGHTS if group in models else StateKind.OPTIMIZER
        what = f"weights of {group!r}" if group in models else f"state of {group!r}"
        if group == "ema" and info.extra.get("ema"):  # a sharded EMA's weights sit beside the models'
            kind, what = StateKind.EMA, "EMA weights"
        items.append(
            StateItem(
                name=f"dcp:{group}",
                kind=kind,
                summary=f"{what}, sharded (DCP): {count} tensors",
                tensors=count,
                nbytes=nbytes,
            )
        )
    ranks = sorted(f for f in info.files if f.startswith("rank-") and f.endswith(".pt"))
    if ranks:
        items.append(
            StateItem(
                name=f"{ranks[0]}..{ranks[-1]}" if len(ranks) > 1 else ranks[0],
                kind=StateKind.RNG,
                summary=f"per-rank RNG states and data position of {len(ranks)} ranks",
            )
        )
    return items


def _weights_file_item(path: str, filename: str) -> StateItem:
    name = filename[: -len(".safetensors")]
    with load_source(path, key=name) as source:
        ties = source.ties()
        infos = [info for k, info in source.infos().items() if k not in ties]
    numel = sum(i.numel for i in infos)
    nbytes = sum(i.nbytes for i in infos)
    dtypes = sorted({i.dtype_name for i in infos})
    kind = StateKind.EMA if name == "ema" else StateKind.WEIGHTS
    label = "EMA weights" if name == "ema" else f"weights of {name!r}"
    return StateItem(
        name=filename,
        kind=kind,
        summary=f"{label}: {len(infos)} tensors, {format_count(numel)} elements ({', '.join(dtypes) or '?'})",
        tensors=len(infos),
        nbytes=nbytes,
    )


def _load_weights_only(path: str) -> Any:
    """The object in a torch pickle, loaded without running code; raises UnsafeLoad."""
    from ladle.formats.safe_globals import weights_only_load

    try:
        return weights_only_load(path, mmap=_is_zip(path))
    except pickle.UnpicklingError as exc:
        if "Weights only load failed" in str(exc):
            raise UnsafeLoad(f"{path}: needs full unpickling") from None
        raise FormatError(f"{path}: not a readable torch checkpoint ({exc})") from None
    except (RuntimeError, EOFError, ValueError) as exc:
        raise FormatError(f"{path}: not a readable torch checkpoint ({exc})") from None


def _is_zip(path: str) -> bool:
    import zipfile

    return zipfile.is_zipfile(path)


def pickle_state(path: str, trust: bool) -> list[StateItem]:
    try:
        obj = _load_weights_only(path)
    except UnsafeLoad:
        if not trust:
            return describe_training_dict(scan_pickle(path).obj)
        log.warning("%s: fully unpickling (trusted)", path)
        obj = _trusted_load(path)
    return describe_training_dict(obj)


def _trusted_load(path: str) -> Any:
    import torch

    return torch.load(path, map_location="cpu", weights_only=False)


def trainer_folder_state(path: str, trust: bool) -> list[StateItem]:
    """Training state files beside the weights (a transformers Trainer checkpoint)."""
    items: list[StateItem] = []
    for name in sorted(os.listdir(path)):
        full = os.path.join(path, name)
        stem = name.split(".", 1)[0]
        if not os.path.isfile(full):
            continue
        if name == "trainer_state.json":
            items.append(_trainer_json(full))
            continue
        kind = next((k for prefix, k in _TRAINER_FILES.items() if stem.startswith(prefix)), None)
        if kind is None or not name.endswith(PICKLE_SUFFIXES):
            continue
        try:
            obj = _load_weights_only(full)
        except UnsafeLoad:
            obj = scan_pickle(full).obj if not trust else _trusted_load(full)
        except FormatError as exc:
            items.append(StateItem(name=name, kind=kind, summary=f"unreadable: {exc}"))
            continue
        count, nbytes = count_tensors(obj)
        items.append(
            StateItem(name=name, kind=kind, summary=summarize(kind, obj), tensors=count, nbytes=nbytes)
        )
    return items


def _trainer_json(path: str) -> StateItem:
    try:
        with open(path, "rb") as handle:
            state = json.load(handle)
        summary = f"global_step {state.get('global_step')}, epoch {state.get('epoch')}"
        history = state.get("log_history") or []
        if history:
            summary += f", {len(history)} log records"
        best = state.get("best_metric")
        if best is not None:
            summary += f", best metric {best}"
    except (OSError, ValueError, AttributeError) as exc:
        summary = f"unreadable: {exc}"
    return StateItem(name=os.path.basename(path), kind=StateKind.COUNTER, summary=summary)
