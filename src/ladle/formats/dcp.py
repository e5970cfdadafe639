"""Read `torch.distributed.checkpoint` (DCP) folders without a process group, tensor by tensor.

A DCP folder holds `.metadata` (a pickle naming every tensor, its full shape
and dtype, and where each shard of it lives) beside the shard files
(`__<rank>_<n>.distcp`). ladle's sharded checkpoints are DCP folders with a
`meta.json` beside them; torchtitan, Lightning's `ModelParallelStrategy` and
plain `dcp.save` write the same layout. `DcpSource` exposes the tensors of one
such folder as a `TensorSource`: `keys()` and `info()` come from `.metadata`
alone, and `tensor(key)` assembles that one tensor from its shards (whatever the
number of ranks that wrote them: each piece is a weights-only torch file at the
offset `.metadata` records, as DCP's own reader reads it; a plain one's bytes are
read straight into their place), so averaging many sharded checkpoints holds about
one tensor per checkpoint in memory. A source's `files` are the shard files holding
its tensors' pieces, not every shard file of the folder: a ladle checkpoint keeps
each object in files of its own (`ladle.saving.sharded`), so averaging its model
reads and hashes none of the optimizer's bytes.

`.metadata` is read without running code from it by `ladle.formats.dcp_metadata`.
"""

from __future__ import annotations

import functools
import io
import os
import re
import threading
import warnings
from collections.abc import Sequence
from typing import Any

import torch

from ladle.errors import FormatError, first_line
from ladle.formats.dcp_metadata import METADATA_NAME, read_metadata, shard_files
from ladle.formats.source import TensorInfo, TensorSource
from ladle.store.ranged import LocalRangedFile, RangedIO

# The top-level entry names that hold model weights, in the order they are preferred,
# and those that hold training state (never model weights), as DCP writers name them:
# ladle and torchtitan ("model", "optimizer", "lr_scheduler", "dataloader", "train_state"),
# Lightning ("state_dict", "optimizer_states", "lr_schedulers").
MODEL_GROUPS = ("model", "state_dict", "module")
TRAINING_GROUPS = frozenset(
    {
        "optimizer",
        "optimizers",
        "optim",
        "optimizer_states",
        "lr_scheduler",
        "lr_schedulers",
        "scheduler",
        "dataloader",
        "train_state",
        "rng",
    }
)

_STEP_IN_NAME = re.compile(r"(?:step|checkpoint|iter|global_step)[-_=]?(\d+)$")


def folder_step(path: str | os.PathLike[str]) -> int | None:
    """The step in a checkpoint folder's name (torchtitan `step-100`, a Trainer's `checkpoint-100`)."""
    found = _STEP_IN_NAME.search(os.path.basename(os.path.normpath(os.fspath(path))))
    return int(found.group(1)) if found else None


def _entry_paths(metadata: Any) -> dict[str, tuple[Any, ...]]:
    """{flattened key: its path in the nested state dict}, from the planner's record when present."""
    recorded = getattr(metadata, "planner_data", None)
    paths: dict[str, tuple[Any, ...]] = {}
    for fqn in metadata.state_dict_metadata:
        path = recorded.get(fqn) if isinstance(recorded, dict) else None
        paths[fqn] = tuple(path) if path else (fqn,)
    return paths


def default_group(groups: Sequence[str]) -> str | None:
    """The top-level entry holding the model weights when no key is given, or None for all tensors."""
    for name in MODEL_GROUPS:
        if name in groups:
            return name
    return None


@functools.cache
def _reader_class() -> type:
    """A DCP `FileSystemReader` that hands out the metadata it was given (read once, safely)."""
    from torch.distributed.checkpoint import FileSystemReader

    class MetadataReader(FileSystemReader):
        def __init__(self, path: str, metadata: Any) -> None:
            super().__init__(path)
            self._given = metadata

        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            return self._given

    return MetadataReader


class DcpSource(TensorSource):
    """The tensors of one DCP folder, read one at a time without a process group.

    `key` picks a top-level entry of the saved state dict (`"model"`,
    `"optimizer"`, a ladle checkpoint's other model names, ...), nested with `.`;
    without it the model weights are chosen: the first of `model`, `state_dict`,
    `module` present, else every tensor outside training-state entries
    (`optimizer`, `lr_scheduler`, `dataloader`, ...). Keys are the names inside
    the chosen entry (`0.weight`, not `model.0.weight`).
    """

    format = "dcp"

    def __init__(self, path: str | os.PathLike[str], *, key: str | None = None, trust: bool = False) -> None:
        super().__init__()
        self.path = os.fspath(path)
        self._metadata = read_metadata(self.path, trust=trust, dcp_classes=False)
        tensors = {
            fqn: entry
            for fqn, entry in self._metadata.state_dict_metadata.items()
            if hasattr(entry, "chunks") and hasattr(entry, "size")
        }
        paths = _entry_paths(self._metadata)
        groups = list(dict.fromkeys(str(paths[fqn][0]) for fqn in tensors if len(paths[fqn]) > 1))
        wanted = key.replace("/", ".").strip(".").split(".") if key else None
        if wanted is None and (chosen := default_group(groups)) is not None:
            wanted = [chosen]
        self._map: dict[str, str] = {}
        for fqn in tensors:
            path_parts = [str(p) for p in paths[fqn]]
            if wanted is None:
                if len(path_parts) > 1 and path_parts[0] in TRAINING_GROUPS:
                    continue
                self._map[fqn] = fqn
            elif path_parts[: len(wanted)] == wanted and len(path_parts) > len(wanted):
                self._map[".".join(path_parts[len(wanted) :])] = fqn
            elif len(path_parts) == 1 and fqn.startswith(prefix := ".".join(wanted) + "."):
                # No planner record of the nesting: the flattened name is all there is.
                self._map[fqn[len(prefix) :]] = fqn
        if not self._map:
            shown = ", ".join(groups) or "no nested entries"
            what = f"under key {key!r}" if key else "outside training state"
            raise FormatError(
                f"{self.path}: a DCP checkpoint with no tensors {what}; it holds: {shown} "
                "(choose one with key= / --key)"
            )
        self._entries = {name: tensors[fqn] for name, fqn in self._map.items()}
        self.groups = groups
        self.files = [os.path.join(self.path, METADATA_NAME), *self._backing_files()]
        self.metadata = {"dcp_groups": groups}
        self._lock = threading.Lock()
        self._cached: tuple[str, torch.Tensor] | None = None

    def _backing_files(self) -> list[str]:
        """The shard files holding a piece of the chosen tensors, as `.metadata` records them.

        ladle's sharded checkpoints keep each registered object in files of its own
        (`ladle.saving.sharded`), so the model's source is backed by the model's
        files alone and averaging hashes none of the optimizer's bytes; a folder
        with one file per rank (DCP's default) is backed by all of them.
        """
        chosen = set(self._map.values())
        used = {
            item.relative_path
            for key, item in (self._metadata.storage_data or {}).items()
            if getattr(key, "fqn", None) in chosen
        }
        if not used:  # no record of where pieces lie: every shard file
            return shard_files(self.path)
        return [os.path.join(self.path, name) for name in sorted(used)]

    def keys(self) -> list[str]:
        return list(self._map)

    def info(self, key: str) -> TensorInfo:
        self._require(key)
        entry = self._entries[key]
        return TensorInfo(torch.Size(entry.size), entry.properties.dtype)

    def tensor(self, key: str) -> torch.Tensor:
        self._require(key)
        with self._lock:
            if self._cached is not None and self._cached[0] == key:
                return self._cached[1]
            tensor = self._load(key)
            # Averaging reads a tensor in blocks; the whole tensor is assembled once.
            self._cached = (key, tensor)
            return tensor

    def _load(self, key: str) -> torch.Tensor:
        try:
            return _load_entry(self.path, self._metadata, self._map[key])
        except Exception as exc:
            raise FormatError(
                f"{self.path}: tensor {key!r} cannot be read ({_why(exc)}); run `ladle verify`"
            ) from exc

    def release(self, key: str) -> None:
        with self._lock:
            if self._cached is not None and self._cached[0] == key:
                self._cached = None

    def close(self) -> None:
        self._cached = None
        self.closed = True


def load_dcp_state_dict(
    path: str | os.PathLike[str], *, key: str | None = None, trust: bool = False
) -> dict[str, torch.Tensor]:
    """Every tensor of a DCP folder (or of one entry, `key`) as full tensors, in one process."""
    with DcpSource(path, key=key, trust=trust) as source:
        return {k: source.tensor(k) for k in source}


def _load_entry(path: str, metadata: Any, fqn: str) -> torch.Tensor:
    """One whole tensor of a DCP folder, assembled from however many shards hold it.

    Each shard piece is what DCP's `FileSystemReader` reads for it: a weights-only
    torch file at (offset, length) of its `.distcp` file. Read directly, a tensor
    costs one read per piece, straight into its place in the tensor; `dcp.load`
    (used for pieces stored with transforms, such as compression) plans every
    call, several times slower per tensor.
    """
    entry = metadata.state_dict_metadata[fqn]
    pieces = []
    for chunk in entry.chunks:
        item = _storage_item(metadata, fqn, chunk.offsets)
        if item is None or getattr(item, "transform_descriptors", None):
            return _load_entry_through_dcp(path, metadata, fqn)
        pieces.append((chunk, item))
    out = torch.empty(torch.Size(entry.size), dtype=entry.properties.dtype)
    for chunk, item in pieces:
        region = out
        for dim, (start, length) in enumerate(zip(chunk.offsets, chunk.sizes, strict=True)):
            region = region.narrow(dim, int(start), int(length))
        _read_piece_into(path, item, region)
    return out


def _storage_item(metadata: Any, fqn: str, offsets: Any) -> Any:
    """Where the piece of `fqn` starting at `offsets` is stored (None when not recorded)."""
    index = getattr(metadata, "_ladle_storage_index", None)
    if index is None:
        index = {
            (key.fqn, tuple(getattr(key, "offset", None) or ())): item
            for key, item in (metadata.storage_data or {}).items()
        }
        metadata._ladle_storage_index = index
    return index.get((fqn, tuple(offsets)))


def _read_piece_into(path: str, item: Any, region: torch.Tensor) -> None:
    """Fill `region` with one piece: its raw bytes read straight into it when the piece is
    one plain C-ordered tensor of that shape and dtype (the usual case), else through
    `torch.load` and a copy (three copies of the bytes instead of one)."""
    file = os.path.join(path, item.relative_path)
    ranged = LocalRangedFile(file)
    try:
        piece = io.BufferedReader(RangedIO(ranged, int(item.offset), int(item.length)))
        layout = torch.load(piece, map_location="meta", weights_only=True)  # callers name the failure
        start = _raw_start(layout, int(item.offset), int(item.length))
        if start is None or layout.shape != region.shape or layout.dtype != region.dtype:
            region.copy_(_read_piece(ranged, file, item))
            return
        target = region if region.is_contiguous() else torch.empty(region.shape, dtype=region.dtype)
        if target.numel():
            try:
                ranged.read_into(memoryview(target.reshape(-1).view(torch.uint8).numpy()), start)
            except EOFError:
                raise FormatError(f"{file}: truncated (a piece ends past the file)") from None
        if target is not region:
            region.copy_(target)
    finally:
        ranged.close()


def _raw_start(layout: Any, offset: int, length: int) -> int | None:
    """Where in the file a piece's tensor bytes start, C-ordered and whole; None when not that simple.

    A piece is a `torch.save` archive, which stores a tensor's storage uncompressed;
    loaded onto the meta device, torch records the storage's offset in the archive.
    (The bytes are taken in this machine's byte order, the order torch.save writes on
    every platform torch builds for today.)
    """
    if type(layout) is not torch.Tensor or not layout.is_contiguous():
        return None
    record = getattr(layout.untyped_storage(), "_checkpoint_offset", None)
    if not isinstance(record, int):
        return None
    start = offset + record + layout.storage_offset() * layout.element_size()
    if start + layout.numel() * layout.element_size() > offset + length:
        return None
    return start


def _read_piece(ranged: LocalRangedFile, file: str, item: Any) -> torch.Tensor:
    """One piece through `torch.load` (of a copy of its bytes)."""
    data = ranged.read(int(item.offset), int(item.length))
    if len(data) != int(item.length):
        raise FormatError(f"{file}: truncated (a piece ends past the file)")
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def _load_entry_through_dcp(path: str, metadata: Any, fqn: str) -> torch.Tensor:
    """One whole tensor assembled by `dcp.load` itself (pieces stored with transforms)."""
    import torch.distributed.checkpoint as dcp

    metadata = read_metadata(path)  # DCP's own classes, which dcp.load needs
    entry = metadata.state_dict_metadata[fqn]
    out = {fqn: torch.empty(torch.Size(entry.size), dtype=entry.properties.dtype)}
    with warnings.catch_warnings():
        # DCP warns that it loads in one process, which is exactly what is asked for.
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(out, storage_reader=_reader_class()(path, metadata), no_dist=True)
    return out[fqn]


def _why(exc: BaseException) -> str:
    """The exception's type and the first line of its message, for one-line findings."""
    return f"{type(exc).__name__}: {first_line(exc, 160)}" if str(exc).strip() else type(exc).__name__


def dcp_problems(path: str | os.PathLike[str], *, load: bool = True) -> list[str]:
    """What is wrong with a DCP folder, one line each; empty when all is well.

    Checks that `.metadata` parses, that every shard it names exists and is long
    enough to hold every piece recorded in it, and with `load=True` reads every
    tensor back (each piece is a weights-only torch file).
    """
    text = os.fspath(path)
    try:
        metadata = read_metadata(text, dcp_classes=False)
    except FormatError as exc:
        return [str(exc)]
    problems: list[str] = []
    ends: dict[str, int] = {}
    for item in (metadata.storage_data or {}).values():
        ends[item.relative_path] = max(ends.get(item.relative_path, 0), int(item.offset) + int(item.length))
    for relative, end in sorted(ends.items()):
        shard = os.path.join(text, relative)
        if not os.path.isfile(shard):
            problems.append(f"{shard}: missing (.metadata lists it)")
        elif (size := os.path.getsize(shard)) < end:
            problems.append(f"{shard}: {size} bytes, but .metadata records data up to byte {end} (truncated)")
    if problems or not load:
        return problems
    for fqn, entry in metadata.state_dict_metadata.items():
        if not hasattr(entry, "chunks"):
            continue
        try:
            _load_entry(text, metadata, fqn)
        except Exception as exc:  # any failure to read is a finding, not a crash
            problems.append(f"{text}: tensor {fqn!r} cannot be read ({_why(exc)})")
    return problems


def group_sizes(path: str | os.PathLike[str]) -> dict[str, tuple[int, int]]:
    """{top-level entry: (tensors, bytes)} of a DCP folder, from `.metadata` alone (for `inspect`)."""
    metadata = read_metadata(path, dcp_classes=False)
    paths = _entry_paths(metadata)
    found: dict[str, tuple[int, int]] = {}
    for fqn, entry in metadata.state_dict_metadata.items():
        if not hasattr(entry, "chunks"):
            continue
        group = str(paths[fqn][0]) if len(paths[fqn]) > 1 else ""
        count, nbytes = found.get(group, (0, 0))
        found[group] = (count + 1, nbytes + torch.Size(entry.size).numel() * entry.properties.dtype.itemsize)
    return found
