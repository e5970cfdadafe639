"""Reading safetensors files (single and sharded) one tensor at a time.

The header is read and validated by `ladle.formats.safetensors_header` rather than
through `safe_open`. `read()` copies a tensor out with `preadv` (memory that outlives
the file); `read_block()`, how the averaging engine reads, answers with a view of the
local file mapped privately: nothing is copied or allocated, and `release_block()`
drops the block's pages from the process again (`ladle.formats.mapped_pages`). Files
on a store (`s3://...`) are read through `ladle.store.paths.open_ranged` instead:
ranged requests for the header, then for the tensors in storage order into a small
reusable buffer, never a download of the whole file.
Names, shapes and dtypes come from the header alone; torch is imported only when a
tensor is read.
"""

from __future__ import annotations

import json
import mmap
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ladle.errors import FormatError
from ladle.formats.gc_pause import paused_gc
from ladle.formats.mapped_pages import drop_pages, inner_pages, map_private
from ladle.formats.safetensors_header import (
    DTYPE_OF,
    ITEMSIZE_OF,
    MAX_HEADER,
    ParsedHeader,
    parse_header,
    validate_header,
)
from ladle.formats.source import ALIASES_KEY, StoredLayout, TensorInfo, TensorSource
from ladle.store.paths import open_ranged, path_isfile, read_path
from ladle.store.ranged import LocalRangedFile, RangedFile

if TYPE_CHECKING:
    import torch

_WINDOW = 4 << 20  # bytes read at once when many small tensors are read in storage order


def tensors_from_buffer(buffer: bytearray, path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every tensor of a safetensors file held in memory, as views of `buffer` (no copy), and
    its `__metadata__`; the header is validated like `read_header`'s."""
    import torch

    from ladle.formats.safetensors_header import DTYPES

    if len(buffer) < 8:
        raise FormatError(f"{path}: too short to be a safetensors file ({len(buffer)} bytes)")
    n = int.from_bytes(buffer[:8], "little")
    if n <= 0 or n > MAX_HEADER or 8 + n > len(buffer):
        raise FormatError(f"{path}: not a safetensors file (header length {n} for {len(buffer)} bytes)")
    try:
        header = json.loads(bytes(buffer[8 : 8 + n]))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise FormatError(f"{path}: safetensors header is not valid JSON; the file is damaged") from None
    start = 8 + n
    header, metadata = validate_header(header, path, len(buffer) - start)
    tensors = {}
    for key, entry in header.items():
        dtype, shape = DTYPES[entry["dtype"]], entry["shape"]
        begin, end = entry["data_offsets"]
        if end == begin:
            tensors[key] = torch.empty(shape, dtype=dtype)
        else:
            flat = torch.frombuffer(buffer, dtype=torch.uint8, count=end - begin, offset=start + begin)
            tensors[key] = flat.view(dtype).view(shape)
    return tensors, metadata


def _read_exact(reader: RangedFile, view: memoryview, offset: int, path: str, key: str) -> None:
    try:
        reader.read_into(view, offset)
    except EOFError:
        raise FormatError(f"{path}: tensor {key!r} ends early; the file is truncated") from None


class SafetensorsFile:
    """One open safetensors file: header parsed once, tensors read with preadv (ranged reads on a
    store); blocks of a local file are views of a private mapping of it (`read_block`)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._map: mmap.mmap | None = None
        self._mapped: torch.Tensor | None = None  # the whole mapping, as bytes
        self._reader: RangedFile | None = open_ranged(path)
        try:
            self.header: ParsedHeader = parse_header(path, self._reader)
        except BaseException:
            self.close()
            raise
        self.data_start, self.entries, self.metadata = (
            self.header.data_start,
            self.header.entries,
            self.header.metadata,
        )
        self._reader.will_read(self.data_start)  # on a store: start fetching the tensors now
        # The spans tile the data section (checked by read_header): it ends at the largest end.
        ends = (entry["data_offsets"][1] for entry in self.entries.values())
        self._data_end = self.data_start + max(ends, default=0)
        self._window: tuple[int, bytes] = (0, b"")

    def info(self, key: str) -> TensorInfo:
        entry = self.entries[key]
        return TensorInfo(entry["shape"], DTYPE_OF[entry["dtype"]])

    def _span(self, key: str) -> tuple[int, int]:
        begin, end = self.entries[key]["data_offsets"]  # integers: checked by read_header
        return self.data_start + begin, end - begin

    def read_block(self, key: str, start: int, count: int, scratch: torch.Tensor | None) -> torch.Tensor:
        """Elements [start, start + count) of `key`, flat: a view of the mapped file when it is
        local (no copy: on a warm page cache, copying is most of what reading costs; drop the
        pages again with `release_block`), else read into `scratch` when it fits."""
        import torch

        from ladle.formats.safetensors_header import DTYPES

        dtype = DTYPES[self.entries[key]["dtype"]]
        offset, _ = self._span(key)
        nbytes = count * dtype.itemsize
        begin = offset + start * dtype.itemsize
        mapped = self._mapping() if nbytes else None
        if mapped is not None:
            if begin + nbytes > mapped.numel():
                raise FormatError(f"{self.path}: tensor {key!r} ends early; the file is truncated")
            return mapped[begin : begin + nbytes].view(dtype)
        if scratch is not None and scratch.numel() >= nbytes:
            buf = scratch[:nbytes]
        else:
            buf = torch.empty(nbytes, dtype=torch.uint8)
        if nbytes:
            _read_exact(self._require_open(), memoryview(buf.numpy()), begin, self.path, key)
        return buf.view(dtype)

    def _mapping(self) -> torch.Tensor | None:
        """The local file mapped privately (copy-on-write, never written), as one byte tensor."""
        if self._mapped is None and isinstance(self._reader, LocalRangedFile) and self._reader.size:
            import torch

            self._map = map_private(self._reader.fileno())
            self._mapped = torch.frombuffer(self._map, dtype=torch.uint8)
        return self._mapped

    def release_block(self, key: str, start: int, count: int) -> None:
        """Drop the mapped pages of a block from this process (they stay in the page cache; a
        later read maps them again from the file, unchanged since the mapping was never written)."""
        if self._mapped is None:
            return
        size = ITEMSIZE_OF[self.entries[key]["dtype"]]
        offset, _ = self._span(key)
        drop_pages(*inner_pages(self._mapped.data_ptr() + offset + start * size, count * size))

    def small_bytes(self, key: str, limit: int) -> bytes | None:
        """The stored bytes of `key` when they are at most `limit` bytes.

        Read through a window of the file (`_WINDOW` bytes at a time), so walking
        100,000 small tensors in storage order costs a few reads, not one each.
        """
        begin, end = self.entries[key]["data_offsets"]  # per call: kept lean for 100,000 keys
        if end - begin > limit:
            return None
        offset = self.data_start + begin
        start, window = self._window
        if not (start <= offset and offset + end - begin <= start + len(window)):
            size = max(end - begin, min(_WINDOW, self._data_end - offset))
            buffer = bytearray(size)
            if size:
                _read_exact(self._require_open(), memoryview(buffer), offset, self.path, key)
            start, window = offset, bytes(buffer)  # bytes: a slice is the answer, no second copy
            self._window = (start, window)
        return window[offset - start : offset - start + end - begin]

    def read_data(self, begin: int, end: int) -> bytes:
        """Bytes [begin, end) of the data section."""
        if end <= begin:
            return b""
        buffer = bytearray(end - begin)
        try:
            self._require_open().read_into(memoryview(buffer), self.data_start + begin)
        except EOFError:
            raise FormatError(f"{self.path}: the tensor data ends early; the file is truncated") from None
        return bytes(buffer)

    def read(self, key: str, scratch: torch.Tensor | None = None) -> torch.Tensor:
        """The tensor `key`; read into the flat uint8 `scratch` when it is large enough."""
        import torch

        shape, dtype = self.info(key)
        begin, end = (int(x) for x in self.entries[key]["data_offsets"])
        nbytes = end - begin
        if nbytes == 0:
            return torch.empty(shape, dtype=dtype)
        if scratch is not None and scratch.numel() >= nbytes:
            buf = scratch[:nbytes]
        else:
            buf = torch.empty(nbytes, dtype=torch.uint8)
        _read_exact(self._require_open(), memoryview(buf.numpy()), self.data_start + begin, self.path, key)
        return buf.view(dtype).view(shape)

    def _require_open(self) -> RangedFile:
        if self._reader is None:
            raise FormatError(f"{self.path}: read after close; open the checkpoint again")
        return self._reader

    def close(self) -> None:
        self._mapped = None
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:
                pass  # a block still in use holds the mapping: it goes with the last of them
            self._map = None
        if self._reader is not None:
            self._reader.close()
            self._reader = None


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
    # An alias may also be stored as a full copy (ladle's default outputs, so plain loaders see
    # every name): it is still read from its target, once.
    return {
        str(k): str(v)
        for k, v in aliases.items()
        if v in stored and k != v and (k not in stored or _same_entry(stored[k], stored[v]))
    }


def _same_entry(a: Any, b: Any) -> bool:
    """Whether two header entries describe tensors of one shape and dtype."""
    try:
        return a["dtype"] == b["dtype"] and list(a["shape"]) == list(b["shape"])
    except (TypeError, KeyError):
        return False


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
        self._aliases = aliases_from_metadata(self.metadata, entries)
        stored = [k for k in entries if k not in self._aliases]
        self._keys = sorted(stored, key=lambda k: entries[k]["data_offsets"][0])  # ints: validated
        self._keys += list(self._aliases)

    def keys(self) -> list[str]:
        return list(self._keys)

    def info(self, key: str) -> TensorInfo:
        self._require(key)
        return self._file.info(self._aliases.get(key, key))

    def infos(self) -> dict[str, TensorInfo]:
        if self.closed:
            self._require("")
        entries, aliases = self._file.entries, self._aliases
        out = {}
        with paused_gc():
            for key in self._keys:
                entry = entries[aliases.get(key, key)]
                out[key] = TensorInfo(entry["shape"], DTYPE_OF[entry["dtype"]])
        return out

    def tensor(self, key: str) -> torch.Tensor:
        self._require(key)
        return self._file.read(self._aliases.get(key, key))

    def read_into(self, key: str, scratch: torch.Tensor) -> torch.Tensor:
        self._require(key)
        return self._file.read(self._aliases.get(key, key), scratch)

    def read_block(self, key: str, start: int, count: int, scratch: torch.Tensor | None) -> torch.Tensor:
        self._require(key)
        return self._file.read_block(self._aliases.get(key, key), start, count, scratch)

    def span(self, key: str) -> tuple[str, int] | None:
        self._require(key)
        return self._file.path, self._file._span(self._aliases.get(key, key))[0]

    def release_block(self, key: str, start: int, count: int) -> None:
        self._file.release_block(self._aliases.get(key, key), start, count)

    def small_bytes(self, key: str, limit: int) -> bytes | None:
        if self.closed:
            self._require(key)
        try:
            return self._file.small_bytes(self._aliases.get(key, key), limit)
        except KeyError:
            self._require(key)  # names the unknown key
            raise

    def ties(self) -> dict[str, str]:
        return dict(self._aliases)

    def stored_layout(self) -> StoredLayout:
        entries = self._file.entries

        def span(key: str) -> tuple[int, int]:
            begin, end = entries[key]["data_offsets"]
            return begin, end

        stored = self._keys[: len(self._keys) - len(self._aliases)]
        return StoredLayout(token=self._file.header, keys=stored, span=span, read=self._file.read_data)

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
                if not path_isfile(shard_path):
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
        self._keys = [k for k in weight_map if k not in self._aliases] + list(self._aliases)

    def keys(self) -> list[str]:
        return list(self._keys)

    def info(self, key: str) -> TensorInfo:
        self._require(key)
        return self._where[key].info(self._aliases.get(key, key))

    def infos(self) -> dict[str, TensorInfo]:
        if self.closed:
            self._require("")
        return {key: self._where[key].info(self._aliases.get(key, key)) for key in self._keys}

    def tensor(self, key: str) -> torch.Tensor:
        self._require(key)
        return self._where[key].read(self._aliases.get(key, key))

    def read_into(self, key: str, scratch: torch.Tensor) -> torch.Tensor:
        self._require(key)
        return self._where[key].read(self._aliases.get(key, key), scratch)

    def read_block(self, key: str, start: int, count: int, scratch: torch.Tensor | None) -> torch.Tensor:
        self._require(key)
        return self._where[key].read_block(self._aliases.get(key, key), start, count, scratch)

    def span(self, key: str) -> tuple[str, int] | None:
        self._require(key)
        shard = self._where[key]
        return shard.path, shard._span(self._aliases.get(key, key))[0]

    def release_block(self, key: str, start: int, count: int) -> None:
        self._where[key].release_block(self._aliases.get(key, key), start, count)

    def small_bytes(self, key: str, limit: int) -> bytes | None:
        self._require(key)
        return self._where[key].small_bytes(self._aliases.get(key, key), limit)

    def ties(self) -> dict[str, str]:
        return dict(self._aliases)

    def close(self) -> None:
        for shard in self._shards.values():
            shard.close()
        self.closed = True


def read_index(index_path: str) -> tuple[dict[str, str], dict[str, Any]]:
    """`weight_map` and `metadata` of a transformers shard index (`*.index.json`)."""
    try:
        data = json.loads(read_path(index_path))
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
