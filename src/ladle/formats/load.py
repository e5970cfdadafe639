"""`load_source`: open any supported checkpoint file or folder as a `TensorSource`.

Files: `.safetensors`, a shard index (`*.safetensors.index.json`,
`pytorch_model.bin.index.json`), torch pickles (`.pt .pth .bin .ckpt .pth.tar`).
Folders: a ladle checkpoint (`meta.json` beside `model.safetensors`; `key="ema"`
reads `ema.safetensors`, any other key `<key>.safetensors`; a sharded one holds a
DCP folder instead, read by model name), a `torch.distributed.checkpoint` folder
(`.metadata` beside `*.distcp`, see `ladle.formats.dcp`), or a
transformers-style model folder (`model.safetensors`, its sharded index,
`pytorch_model.bin`, or its sharded index, in that order).

Paths may be URLs (`s3://`, `gs://`, `memory://`, `file://`): safetensors files
are read with ranged requests, tensor by tensor; a torch pickle, which
`torch.load` needs as a real file, is downloaded to a temporary file that is
deleted when the source is closed.

Readers that need torch (pickles, DCP) are imported when such a file is opened, so
opening a safetensors file or a ladle checkpoint does not import torch.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ladle.errors import CheckpointNotFound, CorruptCheckpoint, FormatError, first_line
from ladle.formats.dcp_metadata import METADATA_NAME as DCP_METADATA
from ladle.formats.dcp_metadata import is_dcp_dir
from ladle.formats.safetensors_io import (
    SafetensorsSource,
    ShardedSafetensorsSource,
)
from ladle.formats.source import (
    PrefixStripped,
    RenamedSource,
    TensorSource,
    normalize_prefixes,
)
from ladle.store.paths import download, open_ranged, path_isfile, path_kind, path_size, read_path
from ladle.store.storage import is_url, local_path_of

if TYPE_CHECKING:
    from ladle.store.checkpoint import FileRecord

log = logging.getLogger("ladle")

# transformers' file names, in the order transformers itself prefers them.
HF_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def load_source(
    path: str | os.PathLike[str],
    *,
    key: str | None = None,
    strip_prefix: str | Sequence[str] | None = (),
    trust: bool = False,
) -> TensorSource:
    """Open `path` for lazy, one-tensor-at-a-time reading.

    `key` picks the state dict inside a torch pickle (nested with `.` or `/`),
    the weights file of a ladle checkpoint (`"ema"` for its EMA weights), or the
    tensors under `key.` in a safetensors file. `strip_prefix` removes leading
    prefixes such as `module.` or `_orig_mod.` from every key ("auto" picks the
    common ones). `trust=True` allows full unpickling of pickles that hold more
    than tensors (that runs code from the file).
    """
    text = local_path_of(os.fspath(path))
    kind = path_kind(text)
    if kind is None:
        raise CheckpointNotFound(f"{text}: no such file or directory")
    if kind == "dir":
        source = _open_dir(text, key, trust)
    else:
        source = _open_file(text, key, trust)
    prefixes = normalize_prefixes(strip_prefix)
    if prefixes:
        source = PrefixStripped(source, prefixes)
    return source


def _open_file(path: str, key: str | None, trust: bool) -> TensorSource:
    lower = path.lower()
    if lower.endswith(".index.json"):
        if lower.endswith(".safetensors.index.json"):
            return _subset(ShardedSafetensorsSource(path), key)
        if is_url(path):
            raise FormatError(f"{path}: sharded torch pickles are read from local folders; copy it first")
        from ladle.formats.torch_io import TorchSource, torch_shards

        return TorchSource(path, key=key, trust=trust, shards=torch_shards(path))
    if lower.endswith(".safetensors"):
        return _subset(SafetensorsSource(path), key)
    from ladle.formats.torch_io import is_torch_file

    if is_torch_file(path):
        return _torch_source(path, key, trust)
    # Unknown suffix: trust the bytes, not the name.
    reader = open_ranged(path)
    try:
        head = reader.read(0, min(9, reader.size))
    finally:
        reader.close()
    if head[:2] == b"PK":
        return _torch_source(path, key, trust)
    if len(head) == 9 and head[8:9] == b"{":
        return _subset(SafetensorsSource(path), key)
    raise FormatError(
        f"{path}: unknown checkpoint format; expected .safetensors, .pt/.pth/.bin/.ckpt or a model folder"
    )


def _torch_source(path: str, key: str | None, trust: bool) -> TensorSource:
    """A torch pickle; one on a store is downloaded first (deleted again on close)."""
    from ladle.formats.torch_io import TorchSource

    if not is_url(path):
        return TorchSource(path, key=key, trust=trust)
    local = download(path)
    try:
        source = TorchSource(local, key=key, trust=trust)
    except BaseException:
        os.remove(local)
        raise
    return _Downloaded(source, path, local)


def _open_dir(path: str, key: str | None, trust: bool) -> TensorSource:
    if path_isfile(os.path.join(path, "meta.json")):
        return _open_ladle_checkpoint(path, key)
    if is_dcp_dir(path):
        return _open_dcp(path, key, trust)
    for name in HF_WEIGHT_FILES:
        candidate = os.path.join(path, name)
        if path_isfile(candidate):
            source = _open_file(candidate, key, trust)
            source.path = path
            source.metadata.update(_trainer_state(path))
            return source
    raise FormatError(_no_weights_message(path))


def _no_weights_message(path: str) -> str:
    """Why a folder has no weights to read: another tool's output folder names its newest
    checkpoint (it holds several, none of them at the top)."""
    from ladle.errors import LadleError
    from ladle.store.foreign_runs import DCP, ForeignRun, foreign_tool

    tool = foreign_tool(path)
    if tool is not None and tool != DCP:
        try:
            latest = ForeignRun(path, tool).latest()
        except LadleError:
            latest = None
        if latest is not None:
            return (
                f"{path}: a {tool} output folder, which holds several checkpoints; name one, "
                f"e.g. the newest: {latest.path} (`ladle ls {path}` lists them)"
            )
    return (
        f"{path}: a folder without model weights (looked for meta.json, a DCP .metadata, "
        f"{', '.join(HF_WEIGHT_FILES)}); pass the weight file itself"
    )


def _open_dcp(path: str, key: str | None, trust: bool) -> TensorSource:
    """A torch.distributed.checkpoint folder (torchtitan, Lightning, `dcp.save`)."""
    from ladle.formats.dcp import DcpSource, folder_step

    source = DcpSource(path, key=key, trust=trust)
    if (step := folder_step(path)) is not None:
        source.metadata["step"] = step
    source.metadata.update(_trainer_state(path))
    return source


def _trainer_state(path: str) -> dict[str, Any]:
    """The step of a transformers Trainer checkpoint folder, from trainer_state.json."""
    state_file = os.path.join(path, "trainer_state.json")
    if not path_isfile(state_file):
        return {}
    try:
        state = json.loads(read_path(state_file))
        return {"global_step": int(state["global_step"]), "epoch": state.get("epoch")}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def _open_ladle_checkpoint(path: str, key: str | None) -> TensorSource:
    from ladle.store.checkpoint import load_meta

    meta_path = os.path.join(path, "meta.json")
    try:
        raw = read_path(meta_path)
        files = load_meta(raw, path).files  # the marker's own checksum and plain file names
        meta = json.loads(raw)
    except (OSError, ValueError, KeyError, AttributeError, TypeError) as exc:
        raise CorruptCheckpoint(
            f"{meta_path}: unreadable meta.json ({first_line(exc, 160)}); run `ladle verify`"
        ) from None
    name = key or "model"
    if DCP_METADATA in files:
        # A sharded checkpoint: the DCP folder holds every model under its registered name.
        _check_size(os.path.join(path, DCP_METADATA), files[DCP_METADATA])
        from ladle.formats.dcp import DcpSource

        source: TensorSource = DcpSource(path, key=name)
        return _ladle_source(source, path, meta, files)
    filename = ladle_weights_file(files, key)
    weights = os.path.join(path, filename) if filename else ""
    if filename is None or not path_isfile(weights):
        available = sorted(f[: -len(".safetensors")] for f in files if f.endswith(".safetensors"))
        what = "EMA weights" if name == "ema" else f"weights {name!r}"
        raise FormatError(
            f"{path}: no {what} ({name}.safetensors); this checkpoint has: "
            f"{', '.join(available) or 'no weight files'} (choose with key= / --key)"
        )
    _check_size(weights, files[filename])
    # Sharded weights (a Trainer checkpoint of a large model, recorded as it is) or a
    # torch file open as they would in a transformers folder; `model.safetensors` directly.
    source = _open_file(weights, None, False)
    try:
        for file in source.files:
            _check_size(file, files.get(os.path.basename(file)))
    except BaseException:
        source.close()
        raise
    return _ladle_source(source, path, meta, files)


def _ladle_source(
    source: TensorSource, path: str, meta: Mapping[str, Any], records: Mapping[str, FileRecord]
) -> TensorSource:
    """`source` labelled as the ladle checkpoint at `path`, with its step, epoch and metrics, and
    the sizes and checksums its meta.json recorded for the files backing it."""
    source.path = path
    source.format = "ladle"
    source.metadata = {
        **source.metadata,
        "name": meta.get("name"),
        "step": meta.get("step"),
        "epoch": meta.get("epoch"),
        "metrics": meta.get("metrics") or {},
        "kind": meta.get("kind", "train"),
    }
    names = {f: os.path.basename(f) for f in source.files}
    source.recorded = {f: records[name] for f, name in names.items() if name in records}
    return source


def ladle_weights_file(files: Mapping[str, Any], key: str | None) -> str | None:
    """The file of a ladle checkpoint (by its meta.json `files`) holding the weights `key` asks for.

    `<key>.safetensors` (`model.safetensors` for None); for the model, a
    checkpoint recorded from a framework's folder may instead hold
    transformers' other names (sharded `model.safetensors.index.json`,
    `pytorch_model.bin`, ...), taken in transformers' order. A sharded checkpoint
    holds every model in its DCP folder: its index, `.metadata`, is returned.
    """
    name = key or "model"
    wanted = f"{name}.safetensors"
    if wanted in files:
        return wanted
    if DCP_METADATA in files:
        return DCP_METADATA
    if name == "model":
        for candidate in HF_WEIGHT_FILES[1:]:
            if candidate in files:
                return candidate
    return None


def _check_size(file: str, record: FileRecord | None) -> None:
    if record is None:
        return
    size = path_size(file)
    if size != record.size:
        raise CorruptCheckpoint(
            f"{file}: {size} bytes but meta.json recorded {record.size}; the file was "
            "truncated or replaced (run `ladle verify`)"
        )


class _Subset(RenamedSource):
    """The tensors under `prefix.` of another source, with the prefix removed."""

    def __init__(self, inner: TensorSource, prefix: str) -> None:
        dotted = prefix.replace("/", ".").rstrip(".") + "."
        mapping = {k[len(dotted) :]: k for k in inner if k.startswith(dotted)}
        if not mapping:
            inner.close()
            raise FormatError(f"{inner.path}: no tensors under key {prefix!r}")
        super().__init__(inner, mapping)


def _subset(source: TensorSource, key: str | None) -> TensorSource:
    return source if key is None else _Subset(source, key)


class _Downloaded(RenamedSource):
    """A source read from a temporary download of `url`; closing it deletes the download."""

    def __init__(self, inner: TensorSource, url: str, local: str) -> None:
        super().__init__(inner, {k: k for k in inner})
        self.path = url
        self.files = [url]
        self._local: str | None = local

    def close(self) -> None:
        try:
            super().close()
        finally:
            if self._local is not None:
                os.remove(self._local)
                self._local = None
