"""What `ladle diff A B` computes: how two checkpoints' tensors differ.

Keys only in one side, shape and dtype changes, and for every shared tensor
whether it is bitwise identical, else its L2 distance `||B - A||`, relative
change `||B - A|| / ||A||` and largest absolute difference. Tensors are read one
pair at a time and compared in float64 chunks, so two large checkpoints never
sit in memory at once and the distances do not lose precision. Small tensors (a
model of 100,000 of them) are compared by their stored bytes and measured in
batches with numpy, so a diff of such files need not import torch.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any

from ladle.errors import ConfigError
from ladle.formats.dtypes import itemsize
from ladle.formats.gc_pause import paused_gc
from ladle.formats.load import load_source
from ladle.formats.source import StoredLayout, TensorInfo, TensorSource
from ladle.store.refs import resolve_checkpoint

if TYPE_CHECKING:
    import torch

_CHUNK = 1 << 22  # elements compared at a time (32 MiB in float64)


class DiffSort(str, Enum):
    """How changed tensors are ordered (largest change first)."""

    RELATIVE = "relative"
    L2 = "l2"
    MAX_ABS = "max_abs"
    NAME = "name"


@dataclass(kw_only=True, frozen=True, slots=True)
class TensorChange:
    """One tensor present in both checkpoints that is not identical."""

    name: str
    shape_a: tuple[int, ...]
    shape_b: tuple[int, ...]
    dtype_a: str
    dtype_b: str
    l2: float | None = None
    """`||B - A||_2` in float64; None when the shapes differ."""
    relative: float | None = None
    """`||B - A|| / ||A||` (inf when A is all zeros); None when the shapes differ."""
    max_abs: float | None = None
    """Largest `|B - A|` of one element; None when the shapes differ."""

    @property
    def numel(self) -> int:
        return math.prod(self.shape_a)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "shape_a": list(self.shape_a),
            "shape_b": list(self.shape_b),
            "dtype_a": self.dtype_a,
            "dtype_b": self.dtype_b,
            "l2": _json_float(self.l2),
            "relative": _json_float(self.relative),
            "max_abs": _json_float(self.max_abs),
        }


@dataclass(kw_only=True)
class Diff:
    """The differences between checkpoints A and B."""

    a: str
    b: str
    only_a: list[str] = field(default_factory=list)
    only_b: list[str] = field(default_factory=list)
    shape_changes: list[TensorChange] = field(default_factory=list)
    dtype_changes: list[TensorChange] = field(default_factory=list)
    """Same shape, different dtype (their values are compared after upcasting)."""
    value_changes: list[TensorChange] = field(default_factory=list)
    """Same shape and dtype, different values; largest change first."""
    identical: int = 0
    """Shared tensors that are bitwise equal (or within `atol`)."""
    atol: float = 0.0

    @property
    def shared(self) -> int:
        return self.identical + len(self.value_changes) + len(self.dtype_changes) + len(self.shape_changes)

    @property
    def same(self) -> bool:
        """True when both hold the same keys with equal shapes, dtypes and values."""
        return not (
            self.only_a or self.only_b or self.shape_changes or self.dtype_changes or self.value_changes
        )

    def summary(self) -> str:
        """One line for people: identical, or what differs and where the largest change is."""
        exact = "bitwise equal" if self.atol == 0 else f"equal within atol={self.atol:g}"
        if self.same:
            return f"identical: {self.identical} tensors, {exact}"
        changed = len(self.value_changes) + len(self.dtype_changes)
        parts = [f"{changed} of {self.shared} shared tensors changed"]
        ranked = [c for c in self.value_changes + self.dtype_changes if c.relative is not None]
        if ranked:
            top = max(ranked, key=_rank_relative)
            parts[0] += f" (largest relative change {_fmt(top.relative)} in {top.name})"
        if self.shape_changes:
            parts.append(f"{len(self.shape_changes)} shape changes")
        if self.dtype_changes:
            parts.append(f"{len(self.dtype_changes)} dtype changes")
        if self.only_a:
            parts.append(f"{len(self.only_a)} only in A")
        if self.only_b:
            parts.append(f"{len(self.only_b)} only in B")
        return "different: " + ", ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (what `ladle diff --json` prints)."""
        return {
            "a": self.a,
            "b": self.b,
            "same": self.same,
            "summary": self.summary(),
            "atol": self.atol,
            "identical": self.identical,
            "shared": self.shared,
            "only_a": self.only_a,
            "only_b": self.only_b,
            "shape_changes": [c.to_dict() for c in self.shape_changes],
            "dtype_changes": [c.to_dict() for c in self.dtype_changes],
            "value_changes": [c.to_dict() for c in self.value_changes],
        }


def diff_checkpoints(
    a: str | os.PathLike[str],
    b: str | os.PathLike[str],
    *,
    key_a: str | None = None,
    key_b: str | None = None,
    strip_prefix: str | Sequence[str] | None = (),
    trust: bool = False,
    atol: float = 0.0,
    sort: DiffSort | str = DiffSort.RELATIVE,
) -> Diff:
    """Compare the tensors of two checkpoints (any format `load_source` reads, or `RUN/best`)."""
    with (
        load_source(resolve_checkpoint(a), key=key_a, strip_prefix=strip_prefix, trust=trust) as source_a,
        load_source(resolve_checkpoint(b), key=key_b, strip_prefix=strip_prefix, trust=trust) as source_b,
    ):
        return diff_sources(source_a, source_b, atol=atol, sort=sort)


def diff_sources(
    a: TensorSource,
    b: TensorSource,
    *,
    atol: float = 0.0,
    sort: DiffSort | str = DiffSort.RELATIVE,
) -> Diff:
    """Compare two open sources tensor by tensor (one pair in memory at a time)."""
    if not isinstance(atol, int | float) or isinstance(atol, bool) or not atol >= 0:
        raise ConfigError(f"atol={atol!r} is not allowed; use a number >= 0")
    try:
        order = DiffSort(sort)
    except ValueError:
        allowed = ", ".join(repr(s.value) for s in DiffSort)
        raise ConfigError(f"sort={sort!r} is not allowed; use one of {allowed}") from None
    with paused_gc():  # records for 100,000 tensors (a MoE model): see gc_pause
        return _diff(a, b, float(atol), order)


def _diff(a: TensorSource, b: TensorSource, atol: float, order: DiffSort) -> Diff:
    layout_a, layout_b = a.stored_layout(), b.stored_layout()
    if layout_a is not None and layout_b is not None and layout_a.token is layout_b.token:
        result = _diff_same_layout(a, b, layout_a, layout_b, atol)
    else:
        result = _diff_key_by_key(a, b, atol)
    result.value_changes.sort(key=_sort_key(order))
    result.dtype_changes.sort(key=_sort_key(order))
    return result


def _diff_key_by_key(a: TensorSource, b: TensorSource, atol: float) -> Diff:
    # Every name, shape and dtype in one pass over each header.
    infos_a, infos_b = a.infos(), b.infos()
    result = Diff(
        a=a.path,
        b=b.path,
        only_a=[k for k in infos_a if k not in infos_b],
        only_b=[k for k in infos_b if k not in infos_a],
        atol=atol,
    )
    batch = _Batch(result, atol)
    small_a, small_b = a.small_bytes, b.small_bytes  # bound once: called per key
    for key, info_a in infos_a.items():
        info_b = infos_b.get(key)
        if info_b is None:
            continue
        # Names and shapes come from the headers as plain values: no torch objects per key.
        dtype_a, dtype_b = info_a.dtype_name, info_b.dtype_name
        if info_a.dims != info_b.dims:
            result.shape_changes.append(TensorChange(**_names(key, info_a, info_b)))
            continue
        if dtype_a == dtype_b and _batchable(dtype_a):
            # Small tensors (a model of 100,000 of them): compare stored bytes, and
            # measure the changed ones together, instead of building tensors per pair.
            bytes_a = small_a(key, _SMALL_BYTES)
            bytes_b = small_b(key, _SMALL_BYTES) if bytes_a is not None else None
            if bytes_a is not None and bytes_b is not None:
                if bytes_a == bytes_b:
                    result.identical += 1
                else:
                    batch.add(_names(key, info_a, info_b), bytes_a, bytes_b)
                continue
        _compare_tensors(a, b, key, info_a, info_b, result, atol)
    batch.flush()
    return result


def _compare_tensors(
    a: TensorSource,
    b: TensorSource,
    key: str,
    info_a: TensorInfo,
    info_b: TensorInfo,
    result: Diff,
    atol: float,
) -> None:
    """Compare one pair of same-shape tensors read whole (chunked in float64) and record it."""
    ta, tb = a.tensor(key), b.tensor(key)
    try:
        if info_a.dtype_name == info_b.dtype_name and _bitwise_equal(ta, tb):
            result.identical += 1
            return
        l2, relative, max_abs = distance(ta, tb)
    finally:
        del ta, tb
        a.release(key)
        b.release(key)
    change = TensorChange(**_names(key, info_a, info_b), l2=l2, relative=relative, max_abs=max_abs)
    if info_a.dtype_name != info_b.dtype_name:
        result.dtype_changes.append(change)
    elif atol > 0 and max_abs <= atol:
        result.identical += 1
    else:
        result.value_changes.append(change)


def _diff_same_layout(
    a: TensorSource, b: TensorSource, layout_a: StoredLayout, layout_b: StoredLayout, atol: float
) -> Diff:
    """Two files that store the same keys, shapes and dtypes at the same offsets (two
    checkpoints of one model): compare their data range by range, and look at a tensor
    only when its bytes differ. No per-key work for the tensors that are equal."""
    result = Diff(a=a.path, b=b.path, atol=atol)
    batch = _Batch(result, atol)
    group: list[tuple[str, int, int]] = []
    span = layout_a.span

    def flush() -> None:
        if group:
            _compare_range(a, b, layout_a, layout_b, group, result, batch)
            group.clear()

    for key in layout_a.keys:
        begin, end = span(key)
        if end - begin > _RANGE_BYTES:
            flush()
            info = a.info(key)
            _compare_tensors(a, b, key, info, info, result, atol)
            continue
        if group and end - group[0][1] > _RANGE_BYTES:
            flush()
        group.append((key, begin, end))
    flush()
    batch.flush()
    ties = a.ties()
    if ties:  # a tied name differs exactly when the tensor it names does
        changed = {c.name: c for c in result.value_changes}
        for alias, target in ties.items():
            change = changed.get(target)
            if change is None:
                result.identical += 1
            else:
                result.value_changes.append(dataclasses.replace(change, name=alias))
    return result


def _compare_range(
    a: TensorSource,
    b: TensorSource,
    layout_a: StoredLayout,
    layout_b: StoredLayout,
    group: list[tuple[str, int, int]],
    result: Diff,
    batch: _Batch,
) -> None:
    """Compare consecutive stored tensors (`(key, begin, end)`, tiling their range) of two
    same-layout files: one read of the range from each, one byte comparison."""
    import numpy as np

    low, high = group[0][1], group[-1][2]
    raw_a, raw_b = layout_a.read(low, high), layout_b.read(low, high)
    if raw_a == raw_b:
        result.identical += len(group)
        return
    filled = [entry for entry in group if entry[2] > entry[1]]  # empty tensors are always equal
    result.identical += len(group) - len(filled)
    starts = np.fromiter((begin - low for _, begin, _ in filled), dtype=np.int64, count=len(filled))
    # The spans tile the range (the header was validated), so segment i is tensor i.
    differs = np.logical_or.reduceat(np.frombuffer(raw_a, np.uint8) != np.frombuffer(raw_b, np.uint8), starts)
    changed = np.flatnonzero(differs).tolist()
    result.identical += len(filled) - len(changed)
    for index in changed:
        key, begin, end = filled[index]
        info = a.info(key)
        if _batchable(info.dtype_name) and end - begin <= _SMALL_BYTES:
            batch.add(_names(key, info, info), raw_a[begin - low : end - low], raw_b[begin - low : end - low])
        else:
            _compare_tensors(a, b, key, info, info, result, batch.atol)


def _names(key: str, info_a: TensorInfo, info_b: TensorInfo) -> dict[str, Any]:
    """The fields of a TensorChange that say what changed (built only for changed tensors)."""
    return {
        "name": key,
        "shape_a": info_a.dims,
        "shape_b": info_b.dims,
        "dtype_a": info_a.dtype_name,
        "dtype_b": info_b.dtype_name,
    }


_SMALL_BYTES = 1 << 16  # tensors up to this size are compared by their bytes, in batches
_BATCH = 4096  # changed small tensors measured together, up to
_BATCH_BYTES = 1 << 23  # stored bytes (as float64: up to 8 times as much)
_RANGE_BYTES = 1 << 24  # bytes of two same-layout files compared at a time


class _Batch:
    """Changed small tensors of one dtype waiting to be measured together (`_measure_batch`)."""

    def __init__(self, result: Diff, atol: float) -> None:
        self.result, self.atol = result, atol
        self.items: list[tuple[dict[str, Any], bytes, bytes]] = []
        self.nbytes = 0

    def add(self, names: dict[str, Any], raw_a: bytes, raw_b: bytes) -> None:
        if self.items and names["dtype_a"] != self.items[0][0]["dtype_a"]:
            self.flush()
        self.items.append((names, raw_a, raw_b))
        self.nbytes += len(raw_a)
        if len(self.items) >= _BATCH or self.nbytes >= _BATCH_BYTES:
            self.flush()

    def flush(self) -> None:
        if self.items:
            _measure_batch(self.items, self.result, self.atol)
            self.nbytes = 0


# Dtypes whose small tensors are compared in batches with numpy (bfloat16 through its
# float32 bit pattern): a diff of such files never imports torch (1-2 s) unless a tensor
# is too large to batch. Other dtypes (float8, complex) go through `distance()`.
_NUMPY_DTYPES = {
    "float64": "<f8",
    "float32": "<f4",
    "float16": "<f2",
    "int64": "<i8",
    "int32": "<i4",
    "int16": "<i2",
    "int8": "i1",
    "uint64": "<u8",
    "uint32": "<u4",
    "uint16": "<u2",
    "uint8": "u1",
    "bool": "?",
}


def _batchable(dtype: str) -> bool:
    return dtype in _NUMPY_DTYPES or dtype == "bfloat16"


def _as_float64_array(raw: bytes, dtype: str) -> Any:
    import numpy as np

    if dtype == "bfloat16":  # the upper half of a float32: exact
        wide = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
        return wide.view(np.float32).astype(np.float64)
    return np.frombuffer(raw, dtype=_NUMPY_DTYPES[dtype]).astype(np.float64)


def _measure_batch(batch: list[tuple[dict[str, Any], bytes, bytes]], result: Diff, atol: float) -> None:
    """`distance()` of many small same-dtype pairs at once (per-pair sums by segment).

    Every pair holds at least one element (empty tensors are equal bytes, never batched).
    """
    import numpy as np

    dtype = batch[0][0]["dtype_a"]
    flat_a = _as_float64_array(b"".join(r for _, r, _ in batch), dtype)
    flat_b = _as_float64_array(b"".join(r for _, _, r in batch), dtype)
    size = itemsize(dtype)
    starts = np.cumsum([0] + [len(raw_a) // size for _, raw_a, _ in batch[:-1]])
    delta = np.abs(flat_b - flat_a)
    diff_sq = np.add.reduceat(np.square(delta), starts).tolist()
    norm_sq = np.add.reduceat(np.square(flat_a), starts).tolist()
    max_abs = np.maximum.reduceat(delta, starts).tolist()  # NaN propagates, as in distance()
    for (names, _, _), d2, n2, largest in zip(batch, diff_sq, norm_sq, max_abs, strict=True):
        l2 = math.sqrt(d2)
        relative = l2 / math.sqrt(n2) if n2 > 0 else (0.0 if l2 == 0 else math.inf)
        if atol > 0 and largest <= atol:
            result.identical += 1
        else:
            result.value_changes.append(TensorChange(**names, l2=l2, relative=relative, max_abs=largest))
    batch.clear()


def _bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bits (so NaNs in the same places count as equal, and -0.0 differs from 0.0)."""
    import torch

    if a.numel() == 0:
        return True
    bits_a = a.reshape(-1).contiguous().view(torch.uint8)
    bits_b = b.reshape(-1).contiguous().view(torch.uint8)
    return bool(torch.equal(bits_a, bits_b))


def distance(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float, float]:
    """(L2 of B - A, that over the L2 of A, largest |B - A|), in float64, chunk by chunk."""
    flat_a, flat_b = a.reshape(-1), b.reshape(-1)
    diff_sq = norm_sq = 0.0
    max_abs = 0.0
    for start in range(0, flat_a.numel(), _CHUNK):
        ca = _as_float64(flat_a[start : start + _CHUNK])
        cb = _as_float64(flat_b[start : start + _CHUNK])
        delta = (cb - ca).abs()
        diff_sq += float(delta.square().sum())
        norm_sq += float(ca.abs().square().sum())
        if delta.numel():
            # torch's max propagates NaN; Python's max(0.0, nan) would hide it, so keep it explicitly.
            largest = float(delta.max())
            if not math.isnan(max_abs) and (math.isnan(largest) or largest > max_abs):
                max_abs = largest
    l2 = math.sqrt(diff_sq)
    if norm_sq > 0:
        relative = l2 / math.sqrt(norm_sq)
    else:
        relative = 0.0 if l2 == 0 else math.inf
    return l2, relative, max_abs


def _as_float64(t: torch.Tensor) -> torch.Tensor:
    import torch

    if t.is_complex():
        return t.to(torch.complex128)
    return t.to(torch.float64)


def _rank_relative(change: TensorChange) -> float:
    value = change.relative
    return math.inf if value is None or math.isnan(value) else value


def _sort_key(order: DiffSort) -> Any:
    def value(v: float | None) -> float:
        # NaN means something became NaN: the most alarming change, so it sorts first.
        return -math.inf if v is None or math.isnan(v) else -v

    if order is DiffSort.NAME:
        return lambda c: c.name
    if order is DiffSort.L2:
        return lambda c: (value(c.l2), c.name)
    if order is DiffSort.MAX_ABS:
        return lambda c: (value(c.max_abs), c.name)
    return lambda c: (value(c.relative), value(c.l2), c.name)


def _json_float(value: float | None) -> float | str | None:
    if value is None or math.isfinite(value):
        return value
    return str(value)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3g}"
