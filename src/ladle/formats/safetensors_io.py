"""Reading safetensors files (single and sharded) one tensor at a time.

The header (8-byte length, JSON) is parsed here rather than through
`safe_open`, so tensors are read with `preadv` straight into a caller's
buffer: `read_block()` reads a slice of a tensor into a small reusable buffer
that stays in the CPU cache, which is how the averaging engine reads: no
allocation, no page faults, nothing of the file mapped into the process, and
each input byte crosses memory once.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import torch

from ladle.errors import FormatError
from ladle.formats.source import ALIASES_KEY, TensorInfo, TensorSource

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "C64": torch.complex64,
}
for _name, _attr in (
    ("U16", "uint16"),
    ("U32", "uint32"),
    ("U64", "uint64"),
    ("F8_E4M3FNUZ", "float8_e4m3fnuz"),
    ("F8_E5M2FNUZ", "float8_e5m2fnuz"),
):
    if hasattr(torch, _attr):
        DTYPES[_name] = getattr(torch, _attr)
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}

_MAX_HEADER = 100 << 20  # the format's own limit
_MAX_IO = 1 << 30  # preadv moves at most ~2 GiB per call on Linux


def read_header(path: str) -> tuple[int, dict[str, Any], dict[str, str]]:
    """(data start offset, tensor entries, `__metadata__`) of a safetensors file."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as handle:
            raw = handle.read(8)
            if len(raw) < 8:
                raise FormatError(f"{path}: too short to be a safetensors file ({size} bytes)")
            n = int.from_bytes(raw, "little")
            if n <= 0 or n > _MAX_HEADER or 8 + n > size:
                raise FormatError(
                    f"{path}: not a safetensors file (header length {n} for {size} bytes); "
                    "is it truncated or another format?"
                )
            header = json.loads(handle.read(n))
    except OSError as exc:
        raise FormatError(f"{path}: cannot read ({exc.strerror or exc})") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise FormatError(f"{path}: safetensors header is not valid JSON; the file is damaged") from None
    if not isinstance(header, dict):
        raise FormatError(f"{path}: safetensors header is not a JSON object; the file is damaged")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise FormatError(f"{path}: safetensors __metadata__ is not an object; the file is damaged")
    data_start = 8 + n
    data_len = size - data_start
    for key, entry in header.items():
        try:
            dtype = DTYPES[entry["dtype"]]
            shape = [int(d) for d in entry["shape"]]
            begin, end = (int(x) for x in entry["data_offsets"])
        except KeyError as exc:
            if exc.args and exc.args[0] == entry.get("dtype"):
                raise FormatError(
                    f"{path}: tensor {key!r} has dtype {entry['dtype']}, which torch cannot hold"
                ) from None
            raise FormatError(f"{path}: tensor {key!r} has a malformed header entry") from None
        except (TypeError, ValueError):
            raise FormatError(f"{path}: tensor {key!r} has a malformed header entry") from None
        numel = 1
        for d in shape:
            numel *= d
        if min(shape, default=0) < 0 or not 0 <= begin <= end <= data_len:
            raise FormatError(
                f"{path}: tensor {key!r} lies outside the file (offsets {begin}-{end}, "
                f"{data_len} data bytes); the file is truncated or damaged"
            )
        if end - begin != numel * dtype.itemsize:
            raise FormatError(
                f"{path}: tensor {key!r} has {end - begin} bytes for shape {shape} "
                f"{entry['dtype']}; the file is damaged"
            )
    return data_start, header, {str(k): str(v) for k, v in metadata.items()}


def _pread_exact(fd: int, view: memoryview, offset: int, path: str, key: str) -> None:
    done = 0
    total = len(view)
    while done < total:
        chunk = view[done : min(total, done + _MAX_IO)]
        n = os.preadv(fd, [chunk], offset + done)
        if n <= 0:
            raise FormatError(f"{path}: tensor {key!r} ends early; the file is truncated")
        done += n


class SafetensorsFile:
    """One open safetensors file: header parsed once, tensors read with preadv."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.data_start, self.entries, self.metadata = read_header(path)
        self.fd = os.open(path, os.O_RDONLY)

    def info(self, key: str) -> TensorInfo:
        entry = self.entries[key]
        return TensorInfo(torch.Size(entry["shape"]), DTYPES[entry["dtype"]])

    def _span(self, key: str) -> tuple[int, int]:
        begin, end = (int(x) for x in self.entries[key]["data_offsets"])
        return self.data_start + begin, end - begin

    def read_block(self, key: str, start: int, count: int, scratch: torch.Tensor | None) -> torch.Tensor:
        """Elements [start, start + count) of `key`, flat, read into `scratch` when it fits."""
        dtype = DTYPES[self.entries[key]["dtype"]]
        offset, _ = self._span(key)
        nbytes = count * dtype.itemsize
        if scratch is not None and scratch.numel() >= nbytes:
            buf = scratch[:nbytes]
        else:
            buf = torch.empty(nbytes, dtype=torch.uint8)
        if nbytes:
            view = memoryview(buf.numpy())
            _pread_exact(self.fd, view, offset + start * dtype.itemsize, self.path, key)
        return buf.view(dtype)

    def read(self, key: str, scratch: torch.Tensor | None = None) -> torch.Tensor:
        """The tensor `key`; read into the flat uint8 `scratch` when it is large enough."""
        shape, dtype = self.info(key)
        begin, end = (int(x) for x in self.entries[key]["data_offsets"])
        nbytes = end - begin
        if nbytes == 0:
            return torch.empty(shape, dtype=dtype)
        if scratch is not None and scratch.numel() >= nbytes:
            buf = scratch[:nbytes]
        else:
            buf = torch.empty(nbytes, dtype=torch.uint8)
        _pread_exact(self.fd, memoryview(buf.numpy()), self.data_start + begin, self.path, key)
        return buf.view(dtype).view(shape)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def aliases_from_metadata(metadata: Mapping[str, str], stored: Mapping[str, Any]) -> dict[str, str]:
    """Tied names recorded by ladle (`ladle.aliases`: {alias: stored key}) that resolve."""
    raw = metadata.get(ALIASES_KEY)
    if not raw:
        return {}
    try:
        aliases = json.loads(raw)
    except json.JSONDecodeError:
        return {}
    if not isinstance(aliases, dict):
        return {}
    return {str(k): str(v) for k, v in aliases.items() if v in stored and k not in stored}


class SafetensorsSource(TensorSource):
    """One `.safetensors` file."""

    format = "safetensors"

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path
        self._file = SafetensorsFile(path)
        self.files = [path]
        self.metadata = dict(self._file.metadata)
        # Storage order: reading in it walks the file front to back; tied names
        # (stored once, listed in `ladle.aliases`) follow.
        entries = self._file.entries
        self._keys = sorted(entries, key=lambda k: int(entries[k]["data_offsets"][0]))
        self._aliases = aliases_from_metadata(self.metadata, entries)
        self._keys += list(self._aliases)

    def keys(self) -> list[str]:
        return list(self._keys)

    def info(self, key: str) -> TensorInfo:
        self._require(key)
        return self._file.info(self._aliases.get(key, key))

    def tensor(self, key: str) -> torch.Tensor:
        self._require(key)
        return self._file.read(self._aliases.get(key, key))

    def read_into(self, key: str, scratch: torch.Tensor) -> torch.Tensor:
        self._require(key)
        return self._file.read(self._aliases.get(key, key), scratch)

    def read_block(self, key: str, start: int, count: int, scratch: torch.Tensor | None) -> torch.Tensor:
        self._require(key)
        return self._file.read_block(self._aliases.get(key, key), start, count, scratch)

    def ties(self) -> dict[str, str]:
        return dict(self._aliases)

    def close(self) -> None:
        self._file.close()
        self.closed = True


class ShardedSafetensorsSource(TensorSource):
    """A transformers-style sharded model: `model.safetensors.index.json` + shards."""

    format = "safetensors-sharded"

    def __init__(self, index_path: str) -> None:
        super().__init__()
        self.path = os.path.dirname(index_path)
        weight_map, index_meta = read_index(index_path)
        folder = os.path.dirname(index_path)
        self._shards: dict[str, SafetensorsFile] = {}
        self._where: dict[str, SafetensorsFile] = {}
        try:
            for shard_name in dict.fromkeys(weight_map.values()):
                shard_path = os.path.join(folder, shard_name)
                if not os.path.isfile(shard_path):
                    raise FormatError(
                        f"{index_path}: shard {shard_name} is missing; copy every shard the index lists"
                    )
                self._shards[shard_name] = SafetensorsFile(shard_path)
            for key, shard_name in weight_map.items():
                shard = self._shards[shard_name]
                if key not in shard.entries:
                    raise FormatError(
                        f"{shard.path}: the index places {key!r} here but the shard lacks it; "
                        "the index and shards are from different saves"
                    )
                self._where[key] = shard
        except BaseException:
            self.close()
            raise
        self.files = [index_path] + [s.path for s in self._shards.values()]
        first = next(iter(self._shards.values()), None)
        self.metadata = {**(first.metadata if first else {}), **index_meta}
        self._aliases = aliases_from_metadata(self.metadata, self._where)
        for alias, target in self._aliases.items():
            self._where[alias] = self._where[target]
        self._keys = list(weight_map) + list(self._aliases)

    def keys(self) -> list[str]:
        return list(self._keys)

    def info(self, key: str) -> TensorInfo:
        self._require(key)
        return self._where[key].info(self._aliases.get(key, key))

    def tensor(self, key: str) -> torch.Tensor:
        self._require(key)
        return self._where[key].read(self._aliases.get(key, key))

    def read_into(self, key: str, scratch: torch.Tensor) -> torch.Tensor:
        self._require(key)
        return self._where[key].read(self._aliases.get(key, key), scratch)

    def read_block(self, key: str, start: int, count: int, scratch: torch.Tensor | None) -> torch.Tensor:
        self._require(key)
        return self._where[key].read_block(self._aliases.get(key, key), start, count, scratch)

    def ties(self) -> dict[str, str]:
        return dict(self._aliases)

    def close(self) -> None:
        for shard in self._shards.values():
            shard.close()
        self.closed = True


def read_index(index_path: str) -> tuple[dict[str, str], dict[str, Any]]:
    """`weight_map` and `metadata` of a transformers shard index (`*.index.json`)."""
    try:
        with open(index_path, "rb") as handle:
            data = json.load(handle)
        weight_map = {str(k): str(v) for k, v in dict(data["weight_map"]).items()}
    except OSError as exc:
        raise FormatError(f"{index_path}: cannot read ({exc.strerror or exc})") from None
    except (ValueError, KeyError, TypeError):
        raise FormatError(
            f"{index_path}: not a shard index (expected JSON with a 'weight_map' object)"
        ) from None
    for shard in weight_map.values():
        if os.path.isabs(shard) or ".." in shard.replace("\\", "/").split("/"):
            raise FormatError(f"{index_path}: shard name {shard!r} points outside the folder")
    meta = data.get("metadata") if isinstance(data.get("metadata"), dict) else {}
    return weight_map, dict(meta or {})
