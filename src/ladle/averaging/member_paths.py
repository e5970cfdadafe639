"""What a user names (files, globs, folders, runs, `RUN@REF`) expanded into loadable paths.

Rules:
- a glob expands to its matches, in natural order (`ckpt_9` before `ckpt_10`);
- a ladle run folder expands to its committed training checkpoints, oldest first;
  `RUN@REF` names one of them (a name, a step, "latest" or "best");
- a transformers Trainer output directory (`checkpoint-<step>/` folders with a
  `trainer_state.json`) expands to those folders, in step order; a timm output
  folder to its `checkpoint-<epoch>.pth.tar` files (not `last`/`model_best`);
- a checkpoint or model folder (ladle `meta.json`, transformers files, a DCP folder)
  is one path; a folder of DCP folders expands to them;
- any other folder expands to the checkpoint files directly inside it.
"""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Iterable
from typing import Any

from ladle.errors import CheckpointNotFound
from ladle.formats.dcp_metadata import is_dcp_dir
from ladle.formats.load import HF_WEIGHT_FILES
from ladle.formats.torch_io import is_torch_file
from ladle.store.foreign_runs import TRANSFORMERS, foreign_tool
from ladle.store.layout import META_NAME
from ladle.store.paths import locate, path_isdir, path_isfile, path_kind
from ladle.store.refs import find_checkpoint, is_run_dir
from ladle.store.run import Run
from ladle.store.storage import is_url, local_path_of
from ladle.store.timm_dirs import TIMM, timm_checkpoints
from ladle.store.trainer_dirs import trainer_checkpoints

_GLOB_CHARS = re.compile(r"[*?\[]")


def natural_key(text: str) -> list[Any]:
    """Sort key that orders digits by value: ckpt_9 < ckpt_10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def _is_weight_file(name: str) -> bool:
    return name.endswith(".safetensors") or is_torch_file(name)


def expand(inputs: Iterable[str | os.PathLike[str]]) -> list[str]:
    """Paths (globs, folders, runs, `RUN@REF`) as a flat list of loadable paths."""
    return [path for item in inputs for path, _ in expand_one(os.fspath(item))]


def expand_one(text: str) -> list[tuple[str, str | None]]:
    """Loadable paths of one input, each with the folder it was listed from (None when the
    path was named, matched by a glob, or is a checkpoint of a run or Trainer output)."""
    text = local_path_of(text)
    kind = path_kind(text)
    if kind == "file":
        return [(text, None)]
    if kind == "dir":
        return _expand_existing(text)
    # RUN@best, RUN/latest, RUN/1200, ... (the grammar lives in ladle.store.refs)
    found = find_checkpoint(text)
    if found is not None:
        return [(found.path, None)]
    if _GLOB_CHARS.search(text):
        matches = sorted(_glob(text), key=natural_key)
        if not matches:
            raise CheckpointNotFound(f"{text}: the pattern matches nothing")
        return [item for match in matches for item in _expand_existing(match)]
    raise CheckpointNotFound(f"{text}: no such file, folder or run checkpoint")


def _glob(pattern: str) -> list[str]:
    """Paths matching a glob, local or on a store (`s3://bucket/run/step-*`)."""
    if not is_url(pattern):
        return glob.glob(pattern, recursive=True)
    storage, where = locate(pattern)
    protocol = where.split("://", 1)[0]
    return [f"{protocol}://{p}" for p in storage.fs.glob(where)]  # type: ignore[attr-defined]


def _expand_existing(path: str) -> list[tuple[str, str | None]]:
    if not path_isdir(path):
        return [(path, None)]
    if path_isfile(os.path.join(path, META_NAME)):
        return [(path, None)]
    if is_run_dir(path):
        checkpoints = [c for c in Run(path).checkpoints() if c.kind == "train"]
        if not checkpoints:
            raise CheckpointNotFound(f"{path}: the run has no committed training checkpoints")
        return [(c.path, None) for c in checkpoints]
    tool = foreign_tool(path)
    if tool == TRANSFORMERS:
        # Its checkpoint-<step>/ folders, not the final model save_model() may have put beside them.
        return [(c.path, None) for c in trainer_checkpoints(path)]
    if tool == TIMM:
        # Its checkpoint-<epoch>.pth.tar files, not last/model_best (copies of one of them).
        return [(c.path, None) for c in timm_checkpoints(path)]
    if is_url(path):
        return _expand_store_folder(path)
    if any(os.path.isfile(os.path.join(path, f)) for f in HF_WEIGHT_FILES) or is_dcp_dir(path):
        return [(path, None)]
    files = sorted(
        (os.path.join(path, n) for n in os.listdir(path) if _is_weight_file(n)),
        key=natural_key,
    )
    files = [f for f in files if os.path.isfile(f)]
    if not files:
        # A folder of DCP checkpoints (torchtitan's checkpoint/step-N/): each one is a member.
        nested = sorted((os.path.join(path, n) for n in os.listdir(path)), key=natural_key)
        if dcp_dirs := [(d, None) for d in nested if is_dcp_dir(d)]:
            return dcp_dirs
        raise CheckpointNotFound(
            f"{path}: no checkpoint files (.safetensors, .pt, .pth, .bin, .ckpt) in this folder"
        )
    return [(f, path) for f in files]


def _expand_store_folder(path: str) -> list[tuple[str, str | None]]:
    """A folder on a store: a model folder, or the weight files in it."""
    if any(path_isfile(os.path.join(path, f)) for f in HF_WEIGHT_FILES):
        return [(path, None)]
    storage, where = locate(path)
    names = [n for n in storage.listdir(where) if _is_weight_file(n)]
    files = sorted((storage.join(where, n) for n in names), key=natural_key)
    if not files:
        raise CheckpointNotFound(
            f"{path}: no checkpoint files (.safetensors, .pt, .pth, .bin, .ckpt) in this folder"
        )
    return [(f, path) for f in files]
