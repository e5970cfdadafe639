"""The shape of an average's output when its members have a shape of their own.

By default an average is one weights file. Two kinds of members call for more,
so that the tool that made them loads the average directly:

- transformers model folders (`save_pretrained`, Trainer `checkpoint-*`):
  the output is a folder that `from_pretrained` loads: `model.safetensors`
  with its provenance (`model.safetensors.json`) beside it, and the newest
  member's config, generation config and tokenizer files. Tied names the
  members leave out (`lm_head.weight`) stay out; `from_pretrained` re-ties
  them. When the newest member is sharded (`model.safetensors.index.json`),
  the average is sharded the same way (same shard names, each tensor where
  the member keeps it) with its own index. `-o DIR` (a name without a weights
  suffix) and `-o DIR/model.safetensors` both make it, creating the folder.
- training pickles of fairseq (`{"model", "cfg"/"args", "extra_state",
  "optimizer_history", ...}`) or timm (`{"state_dict", "state_dict_ema",
  "optimizer", "args", "epoch", ...}`): with `structure="members"`
  (`--keep-structure`) the output is the newest member's whole checkpoint
  with its weights replaced by the average, as fairseq's own
  `average_checkpoints.py` writes it, so `fairseq-generate --path avg.pt` or
  timm's `--resume`/`--initial-checkpoint` read it. The other entries (EMA,
  optimizer, arguments) are the newest member's, unchanged.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import torch

from ladle.averaging.front_doors import AverageResult, average_to_file
from ladle.averaging.member_paths import expand
from ladle.averaging.members import Member
from ladle.errors import ConfigError, FormatError
from ladle.formats.load import HF_WEIGHT_FILES
from ladle.formats.safetensors_io import SafetensorsSource, read_index
from ladle.formats.source import ALIASES_KEY
from ladle.formats.state_dicts import find_state_dict
from ladle.formats.torch_load import load_torch_object
from ladle.formats.write import (
    SafetensorsWriter,
    atomic_path,
    output_location,
    staged_folder_upload,
    write_json,
)
from ladle.store.paths import local_copy
from ladle.store.storage import is_url
from ladle.store.trainer_dirs import copy_model_files

MODEL_FOLDER_WEIGHTS = "model.safetensors"
SHARD_INDEX = "model.safetensors.index.json"
FOLDER_UPLOAD_LAST = (".safetensors.json", ".bin.json", ".safetensors", ".bin", SHARD_INDEX)
"""A `from_pretrained` folder bound for a URL is uploaded file by file, these last, in this
order: the provenance, the weights, their index. Until they arrive the folder holds no
weights (never stale ones, never a mix)."""
STRUCTURES = ("file", "members")
_WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt", ".tar")


def is_model_folder(path: str) -> bool:
    """A transformers model folder: weights under transformers' names and a config.json (a Trainer
    checkpoint recorded in place by LadleCallback is one too, with ladle's meta.json beside)."""
    return (
        os.path.isdir(path)
        and os.path.isfile(os.path.join(path, "config.json"))
        and any(os.path.isfile(os.path.join(path, name)) for name in HF_WEIGHT_FILES)
    )


def model_folder_target(inputs: Sequence[Any], output: str | os.PathLike[str]) -> str | None:
    """The folder to write when every input is a model folder and `output` names a folder
    (no weights suffix, or `.../model.safetensors`); None for a plain file output."""
    text = output_location(output)
    if not inputs or not all(isinstance(i, str | os.PathLike) for i in inputs):
        return None
    try:
        paths = expand(inputs)
    except Exception:  # the average itself reports what is wrong with the inputs
        return None
    if not paths or not all(is_model_folder(p) for p in paths):
        return None
    if os.path.basename(text) == MODEL_FOLDER_WEIGHTS:
        folder = os.path.dirname(text)
    elif os.path.isdir(text) or not text.lower().endswith(_WEIGHT_SUFFIXES):
        folder = text
    else:
        return None
    return folder


def average_to_model_folder(
    inputs: Sequence[str | os.PathLike[str]], folder: str | os.PathLike[str], **options: Any
) -> AverageResult:
    """Average transformers model folders into `folder`, which `from_pretrained` then loads.

    `options` are those of `average_to_file` (weights, dtype, force, ...). A URL is written to a
    local folder first, then uploaded file by file, the weights and their index last.
    """
    if is_url(os.fspath(folder)):
        url = os.fspath(folder).rstrip("/")
        with staged_folder_upload(url, force=bool(options.get("force")), last=FOLDER_UPLOAD_LAST) as local:
            result = average_to_model_folder(inputs, local, **{**options, "force": True})
        return replace(
            result,
            path=f"{url}/{os.path.basename(result.path)}",
            sidecar=f"{url}/{os.path.basename(result.sidecar)}" if result.sidecar else "",
        )
    target = os.path.abspath(os.fspath(folder))
    if os.path.isfile(target):
        raise ConfigError(f"{target}: is a file; the average of model folders is a folder, name a new one")
    made = not os.path.exists(target)
    os.makedirs(target, exist_ok=True)
    try:
        result = average_to_file(inputs, os.path.join(target, MODEL_FOLDER_WEIGHTS), **options)
    except BaseException:
        if made:
            try:
                os.rmdir(target)
            except OSError:
                pass
        raise
    newest = _newest(result.members).source.path
    copy_model_files(newest, target)
    shard_like(os.path.join(target, MODEL_FOLDER_WEIGHTS), os.path.join(newest, SHARD_INDEX))
    return result


def shard_like(single: str, index: str) -> list[str]:
    """Split the average at `single` into the shards the newest member's `index` names (same
    names, each tensor in the shard the member keeps it in), write the index, remove `single`.

    Nothing is done when the member is not sharded (its folder holds one weights file). The
    shards are cut from the written average, so the folder briefly holds both. Returns the
    shard paths written.
    """
    if not os.path.isfile(index):
        return []
    weight_map, _ = read_index(index)
    folder = os.path.dirname(single)
    shards: dict[str, list[str]] = {}
    with SafetensorsSource(single) as source:
        last = list(dict.fromkeys(weight_map.values()))[-1]
        for name in source:
            shards.setdefault(weight_map.get(name, last), []).append(name)
        metadata = {k: v for k, v in source.metadata.items() if k != ALIASES_KEY}
        written, placed, total = [], {}, 0
        for shard, names in shards.items():
            path = os.path.join(folder, shard)
            layout = {name: source.info(name) for name in names}
            with atomic_path(path, force=True) as tmp:
                writer = SafetensorsWriter(tmp, layout, metadata=metadata)
                try:
                    for name in writer.order:
                        writer.write(name, source.tensor(name))
                    writer.finish()
                finally:
                    writer.close()
            written.append(path)
            total += sum(info.nbytes for info in layout.values())
            placed.update(dict.fromkeys(names, shard))
    record = {"metadata": {"total_size": total}, "weight_map": placed}
    write_json(os.path.join(folder, SHARD_INDEX), record, force=True)
    os.remove(single)
    return written


def _newest(members: Sequence[Member]) -> Member:
    """The newest member: highest step when known, then epoch (timm records only epochs), else
    the last named."""

    def order(item: tuple[int, Member]) -> tuple[int, int, int]:
        index, member = item
        step = member.step if member.step is not None else -1
        return step, member.epoch if member.epoch is not None else -1, index

    return max(enumerate(members), key=order)[1]


def average_in_members_structure(
    inputs: Sequence[str | os.PathLike[str]],
    output: str | os.PathLike[str],
    *,
    key: str | None = None,
    trust: bool = False,
    **options: Any,
) -> AverageResult:
    """Average training pickles into `output` in the newest member's own structure.

    The newest member's checkpoint (by step: fairseq's `num_updates`,
    Lightning's `global_step`; then epoch; else the last named) is written whole with the
    state dict the average read (`key`, or the one ladle finds: `model`,
    `state_dict`, ...) replaced by the average; torch format. Provenance goes to
    `<output>.json` as for every average.
    """
    if options.get("format") not in (None, "torch"):
        raise ConfigError("structure='members' writes torch format (the members' own); drop format=")
    result = average_to_file(inputs, output, key=key, trust=trust, **{**options, "format": "torch"})
    newest = _newest(result.members)
    path = newest.source.files[0] if newest.source.files else newest.source.path
    _rewrap(result.path, path, key, trust, force=True)
    return result


def _rewrap(output: str, newest: str, key: str | None, trust: bool, *, force: bool) -> None:
    """Put the flat average written at `output` where the newest member keeps its weights."""
    obj = load_torch_object(newest, trust=trust)
    _, found = find_state_dict(obj, key, newest)
    if found is None:
        return  # the members are bare state dicts: the flat file already is their structure
    with local_copy(output) as local:  # a URL output is downloaded, then replaced by one upload
        averaged = torch.load(local, map_location="cpu", weights_only=True)
    whole = _replace(obj, found.replace("/", ".").split("."), averaged, newest)
    with atomic_path(output, force=force) as tmp:
        torch.save(whole, tmp)


def _replace(obj: Any, path: list[str], value: Mapping[str, torch.Tensor], where: str) -> Any:
    """A shallow copy of `obj` with the entry at `path` (nested dict keys) set to `value`."""
    if not isinstance(obj, Mapping):
        raise FormatError(f"{where}: cannot place the average inside a {type(obj).__name__}")
    head = path[0]
    if head not in obj:  # a key that itself contains a dot ("ema.model" stored whole)
        joined = ".".join(path)
        if joined in obj:
            return {**obj, joined: dict(value)}
        raise FormatError(f"{where}: no entry {joined!r} to hold the average")
    copy = dict(obj)
    copy[head] = dict(value) if len(path) == 1 else _replace(obj[head], path[1:], value, where)
    return copy


def average_to_output(
    inputs: Sequence[Any],
    output: str | os.PathLike[str],
    *,
    structure: str = "file",
    **options: Any,
) -> AverageResult:
    """`average_to_file`, shaped after the members: a `from_pretrained` folder for model folders,
    the members' own checkpoint structure with `structure="members"`, else one file."""
    if structure not in STRUCTURES:
        raise ConfigError(f"structure={structure!r} is not one of {', '.join(STRUCTURES)}")
    if structure == "members":
        return average_in_members_structure(inputs, output, **options)
    folder = model_folder_target(inputs, output)
    if folder is not None:
        return average_to_model_folder(inputs, folder, **options)
    return average_to_file(inputs, output, **options)


__all__ = [
    "STRUCTURES",
    "average_in_members_structure",
    "average_to_model_folder",
    "average_to_output",
    "is_model_folder",
    "model_folder_target",
]
