"""The safetensors header: its length prefix and JSON read, then validated before anything is trusted.

Validated as the safetensors format specifies: the header is a JSON object; every entry
has a known dtype, a shape of non-negative integers whose element count does not
overflow, and integer data offsets whose span is exactly its element count times the
dtype's size; the spans, in order, tile the data section with no gap, no overlap and
nothing after the last one. Files on a store are read by ranged requests
(`ladle.store.paths.open_ranged`), never downloaded whole.
"""

from __future__ import annotations

import json
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ladle.errors import FormatError, StorageError
from ladle.formats.dtypes import itemsize
from ladle.formats.gc_pause import paused_gc
from ladle.store.paths import open_ranged
from ladle.store.ranged import RangedFile

if TYPE_CHECKING:
    import torch

# Safetensors dtype -> torch's dtype name: headers are read and validated without torch.
DTYPE_OF: dict[str, str] = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "C64": "complex64",
    "U16": "uint16",
    "U32": "uint32",
    "U64": "uint64",
    "F8_E4M3FNUZ": "float8_e4m3fnuz",
    "F8_E5M2FNUZ": "float8_e5m2fnuz",
}
ITEMSIZE_OF = {code: itemsize(name) for code, name in DTYPE_OF.items()}


def __getattr__(name: str) -> Any:
    """`DTYPES` (safetensors dtype -> torch dtype) and `DTYPE_NAMES` (the reverse), built on
    first use: they need torch, which reading a header does not."""
    if name not in ("DTYPES", "DTYPE_NAMES"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import torch

    dtypes: dict[str, torch.dtype] = {
        code: getattr(torch, attr) for code, attr in DTYPE_OF.items() if hasattr(torch, attr)
    }
    globals()["DTYPES"] = dtypes
    globals()["DTYPE_NAMES"] = {v: k for k, v in dtypes.items()}
    return globals()[name]


MAX_HEADER = 100 << 20  # the format's own limit
_MAX_NUMEL = (1 << 63) - 1  # torch sizes are int64; safetensors refuses any overflow too


@dataclass(frozen=True, eq=False)
class ParsedHeader:
    """A validated header: where the data starts, the tensor entries (shared: read-only) and
    `__metadata__`. Two files opened with byte-identical headers and data sizes share one
    (`parse_header`), which is how a diff of two checkpoints of one model knows that their
    tensors lie at the same offsets."""

    data_start: int
    entries: dict[str, Any]
    metadata: dict[str, str]
    __slots__ = ("__weakref__", "data_start", "entries", "metadata")


# Headers of files open now, by (data size, header bytes): the second checkpoint of a model
# of 100,000 tensors is neither parsed nor validated again. Held weakly: closing the last
# file that uses a header frees it.
_OPEN_HEADERS: weakref.WeakValueDictionary[tuple[int, bytes], ParsedHeader] = weakref.WeakValueDictionary()


def read_header(path: str, reader: RangedFile | None = None) -> tuple[int, dict[str, Any], dict[str, str]]:
    """(data start offset, tensor entries, `__metadata__`) of a safetensors file, validated."""
    parsed = parse_header(path, reader)
    return parsed.data_start, parsed.entries, parsed.metadata


def parse_header(path: str, reader: RangedFile | None = None) -> ParsedHeader:
    """The validated header of a safetensors file; the same object for files whose header
    bytes and data size are equal while either is open (keep it to keep it shared)."""
    try:
        handle = reader if reader is not None else open_ranged(path)
        try:
            size = handle.size
            raw = handle.read(0, 8) if size >= 8 else b""
            if len(raw) < 8:
                raise FormatError(f"{path}: too short to be a safetensors file ({size} bytes)")
            n = int.from_bytes(raw, "little")
            if n <= 0 or n > MAX_HEADER or 8 + n > size:
                raise FormatError(
                    f"{path}: not a safetensors file (header length {n} for {size} bytes); "
                    "is it truncated or another format?"
                )
            text = bytes(handle.read(8, n))
            known = _OPEN_HEADERS.get((size, text))
            if known is not None:
                return known
            with paused_gc():  # 100,000 entries: see gc_pause
                header = json.loads(text)
        finally:
            if reader is None:
                handle.close()
    except StorageError:
        raise
    except (OSError, EOFError) as exc:
        raise FormatError(f"{path}: cannot read ({getattr(exc, 'strerror', None) or exc})") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise FormatError(f"{path}: safetensors header is not valid JSON; the file is damaged") from None
    with paused_gc():
        entries, metadata = validate_header(header, path, size - 8 - n)
    parsed = ParsedHeader(8 + n, entries, metadata)
    _OPEN_HEADERS[(size, text)] = parsed
    return parsed


def validate_header(header: Any, path: str, data_len: int) -> tuple[dict[str, Any], dict[str, str]]:
    """The tensor entries and `__metadata__` of a parsed header, after checking every entry
    and that their spans tile the `data_len` bytes after the header exactly."""
    if not isinstance(header, dict):
        raise FormatError(f"{path}: safetensors header is not a JSON object; the file is damaged")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise FormatError(f"{path}: safetensors __metadata__ is not an object; the file is damaged")
    _check_tiling(path, [_span_of(path, key, entry) for key, entry in header.items()], data_len)
    return header, {str(k): str(v) for k, v in metadata.items()}


def _span_of(path: str, key: str, entry: Any) -> tuple[int, int, str]:
    """(begin, end, key) of one header entry, after checking its dtype, shape and size."""
    try:
        size = ITEMSIZE_OF[entry["dtype"]]
        shape = entry["shape"]
        begin, end = entry["data_offsets"]
    except KeyError as exc:
        if isinstance(entry, dict) and exc.args and exc.args[0] == entry.get("dtype"):
            raise FormatError(
                f"{path}: tensor {key!r} has dtype {entry['dtype']}, which torch cannot hold"
            ) from None
        raise FormatError(f"{path}: tensor {key!r} has a malformed header entry") from None
    except (TypeError, ValueError):
        raise FormatError(f"{path}: tensor {key!r} has a malformed header entry") from None
    if type(begin) is not int or type(end) is not int or type(shape) is not list:
        raise FormatError(f"{path}: tensor {key!r} has a malformed header entry")
    numel = 1
    for d in shape:
        if type(d) is not int or d < 0:
            raise FormatError(f"{path}: tensor {key!r} has a malformed shape {shape}")
        numel *= d
        if numel > _MAX_NUMEL:
            raise FormatError(f"{path}: tensor {key!r} has an impossible shape {shape} (too many elements)")
    if not 0 <= begin <= end or end - begin != numel * size:
        raise FormatError(
            f"{path}: tensor {key!r} has {end - begin} bytes for shape {shape} "
            f"{entry['dtype']}; the file is damaged"
        )
    return begin, end, key


def _check_tiling(path: str, spans: list[tuple[int, int, str]], data_len: int) -> None:
    """The tensors' byte spans must cover the data section exactly, in order."""
    spans.sort()
    position, previous = 0, None
    for begin, end, key in spans:
        if begin < position:
            raise FormatError(
                f"{path}: tensor {key!r} overlaps tensor {previous!r} (data offsets {begin}-{end}); "
                "the file is damaged"
            )
        if begin > position:
            raise FormatError(
                f"{path}: {begin - position} unused bytes before tensor {key!r} (data offsets "
                f"{begin}-{end}); the file is damaged"
            )
        if end > data_len:
            raise FormatError(
                f"{path}: tensor {key!r} lies outside the file (offsets {begin}-{end}, "
                f"{data_len} data bytes); the file is truncated or damaged"
            )
        position, previous = end, key
    if position != data_len:
        raise FormatError(
            f"{path}: {data_len - position} bytes after the last tensor; the file is damaged "
            "or not a safetensors file"
        )
