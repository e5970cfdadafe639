"""`TensorSource`: a lazily read set of named tensors, whatever file format holds them.

Averaging never holds more than one source checkpoint in memory, so readers
expose names, shapes and dtypes without reading data (`keys()`, `info()`), and
hand out one tensor at a time (`tensor()`). Every reader of `ladle.formats`
returns a subclass of `TensorSource`; `DictSource` wraps an in-memory state dict
so Python callers can average tensors they already hold.

Nothing here imports torch at module level: `ladle inspect` of a safetensors file
or a ladle checkpoint describes tensors from headers alone, without paying for torch.
"""

from __future__ import annotations

import logging
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any

from ladle.errors import FormatError
from ladle.formats.dtypes import dtype_name, is_floating_name, itemsize, torch_dtype

if TYPE_CHECKING:
    import torch

    from ladle.store.checkpoint import FileRecord

log = logging.getLogger("ladle")

# Safetensors metadata entry listing tied names stored once: {alias: stored key}
# (the run store writes model.safetensors the same way).
ALIASES_KEY = "ladle.aliases"
# Keys users most often need to drop: DataParallel/DDP wrappers, torch.compile, Lightning.
COMMON_PREFIXES = ("module.", "_orig_mod.", "model.")


class TensorInfo:
    """Shape and dtype of one stored tensor (unpacks as `shape, dtype`, like a pair).

    Held as plain values, `dims` (a tuple of ints) and `dtype_name` ("float32"), so that
    readers of file headers build it without torch; `shape` (a torch.Size) and `dtype`
    (a torch.dtype) are converted when asked for, which imports torch. `numel`,
    `nbytes`, `itemsize` and `is_floating_point` need no torch.
    """

    __slots__ = ("dims", "dtype_name")

    def __init__(self, shape: Iterable[int], dtype: torch.dtype | str) -> None:
        self.dims: tuple[int, ...] = tuple(shape)
        self.dtype_name: str = dtype if isinstance(dtype, str) else dtype_name(dtype)

    @property
    def shape(self) -> torch.Size:
        import torch

        return torch.Size(self.dims)

    @property
    def dtype(self) -> torch.dtype:
        return torch_dtype(self.dtype_name)

    @property
    def numel(self) -> int:
        return math.prod(self.dims)

    @property
    def itemsize(self) -> int:
        return itemsize(self.dtype_name)

    @property
    def nbytes(self) -> int:
        return self.numel * itemsize(self.dtype_name)

    @property
    def is_floating_point(self) -> bool:
        return is_floating_name(self.dtype_name)

    def __iter__(self) -> Iterator[Any]:
        yield self.shape
        yield self.dtype

    def __len__(self) -> int:
        return 2

    def __getitem__(self, index: int) -> Any:
        return (self.shape, self.dtype)[index]

    def __eq__(self, other: object) -> bool:
        if isinstance(other, TensorInfo):
            return self.dims == other.dims and self.dtype_name == other.dtype_name
        if isinstance(other, tuple):
            return tuple(self) == other
        return NotImplemented

    def __hash__(self) -> int:
        return hash((self.dims, self.dtype_name))

    def __repr__(self) -> str:
        return f"TensorInfo(shape={list(self.dims)}, dtype={self.dtype_name})"


@dataclass(frozen=True, eq=False)
class StoredLayout:
    """Where a source's tensors lie in its one file: lets a tool compare two files of one
    layout range by range (`ladle diff` of two checkpoints of one model) instead of key by key."""

    token: object
    """The same object (`is`) for two sources whose keys, shapes, dtypes, ties and byte offsets
    are all the same (safetensors files with byte-identical headers)."""
    keys: Sequence[str]
    """The stored keys (not their tied names), in storage order."""
    span: Callable[[str], tuple[int, int]]
    """A stored key's bytes: [begin, end) within the data."""
    read: Callable[[int, int], bytes]
    """The data bytes [begin, end), read now."""


class TensorSource(ABC):
    """Named tensors read lazily from one checkpoint; a context manager.

    Attributes: `path` (what was opened), `format` (a short name such as
    "safetensors", "torch", "safetensors-sharded", "ladle"), `metadata` (text
    and numbers stored beside the tensors), `files` (the files that back it, for
    duplicate detection and hashing), `recorded` (what a ladle meta.json recorded
    for backing files, by path: sizes and checksums, known without reading).
    """

    path: str
    format: str

    def __init__(self) -> None:
        self.metadata: dict[str, Any] = {}
        self.files: list[str] = []
        self.recorded: dict[str, FileRecord] = {}
        self.closed = False

    @abstractmethod
    def keys(self) -> list[str]:
        """Tensor names in storage order."""

    @abstractmethod
    def info(self, key: str) -> TensorInfo:
        """Shape and dtype of `key`, without reading its data."""

    def infos(self) -> dict[str, TensorInfo]:
        """`{key: info(key)}` for every key, in key order. Readers that hold a header answer
        in one pass over it, which matters for a model of 100,000 tensors (inspect, diff)."""
        return {key: self.info(key) for key in self.keys()}

    @abstractmethod
    def tensor(self, key: str) -> torch.Tensor:
        """The tensor `key`, read now; treat it as read-only (it may map the file)."""

    def ties(self) -> dict[str, str]:
        """Aliases: `{key: canonical_key}` for tensors stored once under several names."""
        return {}

    def read_block(self, key: str, start: int, count: int, scratch: torch.Tensor | None) -> torch.Tensor:
        """Elements [start, start + count) of `key`, flattened (C order).

        Readers that copy from a file fill the flat uint8 `scratch` buffer when
        it is large enough, so reading a large tensor in blocks needs no
        allocation; others return a view. Treat the result as read-only and
        finish with it before the next call.
        """
        return self.tensor(key).reshape(-1)[start : start + count]

    def span(self, key: str) -> tuple[str, int] | None:
        """(file, byte offset) where `key`'s bytes lie, contiguous, when `read_block` reads
        them from there; None otherwise. Lets a caller hash exactly the bytes it read."""
        return None

    def release_block(self, key: str, start: int, count: int) -> None:  # noqa: B027 - optional hook
        """Hint that elements [start, start + count) of `key` will not be read again."""

    def small_bytes(self, key: str, limit: int) -> bytes | None:
        """The stored bytes of `key` when the reader can hand them over cheaply and they are at
        most `limit` bytes; None otherwise. Lets a tool compare many small tensors without
        building a tensor for each (a model of 100,000 tensors)."""
        return None

    def stored_layout(self) -> StoredLayout | None:
        """Where the tensors lie in the source's one file, when the reader knows; else None."""
        return None

    def release(self, key: str) -> None:  # noqa: B027 - an optional hook, a no-op by default
        """Hint that `key` will not be read again, so its mapped pages can be dropped."""

    @property
    def step(self) -> int | None:
        """The training step recorded with the checkpoint, when the format keeps one."""
        for name in ("step", "global_step", "num_updates", "iteration"):
            value = self.metadata.get(name)
            if isinstance(value, int) and not isinstance(value, bool):
                return value
            if isinstance(value, str) and value.isdigit():
                return int(value)
        return None

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Every tensor, read now (ties restored as shared tensors)."""
        ties = self.ties()
        out: dict[str, torch.Tensor] = {}
        for key in self.keys():
            if key not in ties:
                out[key] = self.tensor(key)
        for key in self.keys():
            if key in ties:
                out[key] = out[ties[key]]
        return {key: out[key] for key in self.keys()}

    def _require(self, key: str) -> None:
        if self.closed:
            raise FormatError(f"{self.path}: the source is closed; open it again with load_source()")
        if key not in self:
            raise FormatError(f"{self.path}: no tensor {key!r}; it holds {len(self)} tensors")

    def _key_set(self) -> frozenset[str]:
        # A source's names never change once open: build the set once, so a membership
        # test per tensor keeps inspect/diff/average linear in the tensor count.
        try:
            return self._source_key_set
        except AttributeError:
            self._source_key_set: frozenset[str] = frozenset(self.keys())
            return self._source_key_set

    def __contains__(self, key: object) -> bool:
        try:
            return key in self._source_key_set
        except AttributeError:
            return key in self._key_set()

    def __len__(self) -> int:
        return len(self._key_set())

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def close(self) -> None:
        """Release file handles and mappings; idempotent."""
        self.closed = True

    def __enter__(self) -> TensorSource:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path!r}, format={self.format!r})"


class DictSource(TensorSource):
    """An in-memory state dict seen as a source (ties detected from shared storage)."""

    format = "dict"

    def __init__(
        self,
        tensors: Mapping[str, torch.Tensor],
        *,
        path: str = "<state dict>",
        metadata: Mapping[str, Any] | None = None,
    ) -> None:
        import torch

        super().__init__()
        self.path = path
        bad = [k for k, v in tensors.items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise FormatError(f"{path}: {bad[0]!r} is not a tensor; pass a mapping of tensors")
        self._tensors = dict(tensors)
        self._ties = find_ties(self._tensors)
        self.metadata = dict(metadata or {})

    def keys(self) -> list[str]:
        return list(self._tensors)

    def info(self, key: str) -> TensorInfo:
        self._require(key)
        t = self._tensors[key]
        return TensorInfo(t.shape, t.dtype)

    def tensor(self, key: str) -> torch.Tensor:
        self._require(key)
        # The engine works on the CPU; tensors on an accelerator are copied over.
        return self._tensors[key].detach().cpu()

    def ties(self) -> dict[str, str]:
        return dict(self._ties)


def find_ties(tensors: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """Keys whose tensors are the very same memory (same storage, offset, shape, stride)."""
    seen: dict[tuple[Any, ...], str] = {}
    ties: dict[str, str] = {}
    for key, t in tensors.items():
        if t.device.type == "meta" or t.numel() == 0:
            continue
        ident = (
            t.device,
            t.untyped_storage().data_ptr(),
            t.storage_offset(),
            tuple(t.shape),
            t.stride(),
            t.dtype,
        )
        if ident in seen:
            ties[key] = seen[ident]
        else:
            seen[ident] = key
    return ties


def normalize_prefixes(strip_prefix: str | Sequence[str] | None) -> tuple[str, ...]:
    """`strip_prefix` as a tuple; "auto" means `module.` and `_orig_mod.` (and `model.`
    when every key has it, as in Lightning checkpoints)."""
    if strip_prefix is None:
        return ()
    if isinstance(strip_prefix, str):
        strip_prefix = [strip_prefix]
    out: list[str] = []
    for p in strip_prefix:
        for part in str(p).split(","):
            part = part.strip()
            if part:
                out.append(part)
    return tuple(out)


def strip_key(key: str, prefixes: Iterable[str]) -> str:
    """Remove any of `prefixes` from the start of `key`, repeatedly (`module._orig_mod.x` -> `x`)."""
    prefixes = tuple(prefixes)
    changed = True
    while changed:
        changed = False
        for prefix in prefixes:
            if key.startswith(prefix) and len(key) > len(prefix):
                key = key[len(prefix) :]
                changed = True
    return key


class RenamedSource(TensorSource):
    """A view of another source under other key names: `mapping` is {new name: inner name}."""

    def __init__(self, inner: TensorSource, mapping: dict[str, str]) -> None:
        super().__init__()
        self.inner = inner
        self.path = inner.path
        self.format = inner.format
        self.metadata = inner.metadata
        self.files = inner.files
        self.recorded = inner.recorded
        self._map = mapping
        self._back = {v: k for k, v in mapping.items()}

    def keys(self) -> list[str]:
        return list(self._map)

    def info(self, key: str) -> TensorInfo:
        self._require(key)
        return self.inner.info(self._map[key])

    def infos(self) -> dict[str, TensorInfo]:
        inner = self.inner.infos()
        return {key: inner[name] for key, name in self._map.items()}

    def tensor(self, key: str) -> torch.Tensor:
        self._require(key)
        return self.inner.tensor(self._map[key])

    def read_into(self, key: str, scratch: torch.Tensor) -> torch.Tensor:
        self._require(key)
        return read_into(self.inner, self._map[key], scratch)

    def read_block(self, key: str, start: int, count: int, scratch: torch.Tensor | None) -> torch.Tensor:
        self._require(key)
        return self.inner.read_block(self._map[key], start, count, scratch)

    def span(self, key: str) -> tuple[str, int] | None:
        return self.inner.span(self._map[key]) if key in self._map else None

    def release_block(self, key: str, start: int, count: int) -> None:
        if key in self._map:
            self.inner.release_block(self._map[key], start, count)

    def small_bytes(self, key: str, limit: int) -> bytes | None:
        return self.inner.small_bytes(self._map[key], limit) if key in self._map else None

    def release(self, key: str) -> None:
        if key in self._map:
            self.inner.release(self._map[key])

    def ties(self) -> dict[str, str]:
        return {
            self._back[k]: self._back[v]
            for k, v in self.inner.ties().items()
            if k in self._back and v in self._back
        }

    @property
    def step(self) -> int | None:
        return self.inner.step

    def close(self) -> None:
        self.inner.close()
        self.closed = True


class PrefixStripped(RenamedSource):
    """A view of another source with key prefixes removed (`module.`, `_orig_mod.`, ...)."""

    def __init__(self, inner: TensorSource, prefixes: Sequence[str]) -> None:
        chosen = list(prefixes)
        if "auto" in chosen:
            chosen.remove("auto")
            chosen += ["module.", "_orig_mod."]
            inner_keys = inner.keys()
            if inner_keys and all(k.startswith("model.") for k in inner_keys):
                chosen.append("model.")
        self.prefixes = tuple(dict.fromkeys(chosen))
        mapping: dict[str, str] = {}
        for key in inner:
            new = strip_key(key, self.prefixes)
            if new in mapping:
                raise FormatError(
                    f"{inner.path}: stripping {', '.join(self.prefixes)} maps both "
                    f"{mapping[new]!r} and {key!r} to {new!r}; strip fewer prefixes"
                )
            mapping[new] = key
        super().__init__(inner, mapping)


def read_into(source: TensorSource, key: str, scratch: torch.Tensor) -> torch.Tensor:
    """`source.tensor(key)`, read into the flat uint8 `scratch` buffer when the reader can.

    Readers that copy from a file (safetensors) fill `scratch` to avoid a fresh
    allocation (and its page faults) per tensor; readers that map the file hand
    back the mapped tensor itself.
    """
    method = getattr(source, "read_into", None)
    if method is not None:
        return method(key, scratch)  # type: ignore[no-any-return]
    return source.tensor(key)
