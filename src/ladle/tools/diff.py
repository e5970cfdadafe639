"""What `ladle diff A B` computes: how two checkpoints' tensors differ.

Keys only in one side, shape and dtype changes, and for every shared tensor
whether it is bitwise identical, else its L2 distance `||B - A||`, relative
change `||B - A|| / ||A||` and largest absolute difference. Tensors are read one
pair at a time and compared in float64 chunks, so two large checkpoints never
sit in memory at once and the distances do not lose precision.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import torch

from ladle.errors import ConfigError
from ladle.formats import TensorSource, load_source
from ladle.store.refs import resolve_checkpoint

_CHUNK = 1 << 22  # elements compared at a time (32 MiB in float64)


class DiffSort(str, Enum):
    """How changed tensors are ordered (largest change first)."""

    RELATIVE = "relative"
    L2 = "l2"
    MAX_ABS = "max_abs"
    NAME = "name"


@dataclass(kw_only=True, frozen=True)
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
    keys_a, keys_b = a.keys(), b.keys()
    set_a, set_b = set(keys_a), set(keys_b)
    result = Diff(
        a=a.path,
        b=b.path,
        only_a=[k for k in keys_a if k not in set_b],
        only_b=[k for k in keys_b if k not in set_a],
        atol=float(atol),
    )
    batch: list[tuple[dict[str, Any], bytes, bytes]] = []
    for key in keys_a:
        if key not in set_b:
            continue
        info_a, info_b = a.info(key), b.info(key)
        if batch and _dtype(info_a.dtype) != batch[0][0]["dtype_a"]:
            _measure_batch(batch, _DTYPES[batch[0][0]["dtype_a"]], result, atol)
        shape_a, shape_b = tuple(info_a.shape), tuple(info_b.shape)
        names = {
            "name": key,
            "shape_a": shape_a,
            "shape_b": shape_b,
            "dtype_a": _dtype(info_a.dtype),
            "dtype_b": _dtype(info_b.dtype),
        }
        if shape_a != shape_b:
            result.shape_changes.append(TensorChange(**names))
            continue
        if info_a.dtype == info_b.dtype and _batchable(info_a.dtype):
            # Small tensors (a model of 100,000 of them): compare stored bytes, and
            # measure the changed ones together, instead of building tensors per pair.
            bytes_a = a.small_bytes(key, _SMALL_BYTES)
            bytes_b = b.small_bytes(key, _SMALL_BYTES) if bytes_a is not None else None
            if bytes_a is not None and bytes_b is not None:
                if bytes_a == bytes_b:
                    result.identical += 1
                else:
                    batch.append((names, bytes_a, bytes_b))
                    if len(batch) >= _BATCH:
                        _measure_batch(batch, info_a.dtype, result, atol)
                continue
        ta, tb = a.tensor(key), b.tensor(key)
        try:
            if info_a.dtype == info_b.dtype and _bitwise_equal(ta, tb):
                result.identical += 1
                continue
            l2, relative, max_abs = distance(ta, tb)
        finally:
            del ta, tb
            a.release(key)
            b.release(key)
        change = TensorChange(**names, l2=l2, relative=relative, max_abs=max_abs)
        if info_a.dtype != info_b.dtype:
            result.dtype_changes.append(change)
        elif atol > 0 and max_abs <= atol:
            result.identical += 1
        else:
            result.value_changes.append(change)
    if batch:
        _measure_batch(batch, _DTYPES[batch[0][0]["dtype_a"]], result, atol)
    result.value_changes.sort(key=_sort_key(order))
    result.dtype_changes.sort(key=_sort_key(order))
    return result


_SMALL_BYTES = 1 << 16  # tensors up to this size are compared by their bytes, in batches
_BATCH = 4096  # changed small tensors measured together
_DTYPES = {
    _name: _value
    for _name, _value in ((str(d).replace("torch.", ""), d) for d in vars(torch).values())
    if isinstance(_value, torch.dtype)
}


def _batchable(dtype: torch.dtype) -> bool:
    return not dtype.is_complex and dtype.itemsize > 0


def _measure_batch(
    batch: list[tuple[dict[str, Any], bytes, bytes]], dtype: torch.dtype, result: Diff, atol: float
) -> None:
    """`distance()` of many small same-dtype pairs at once (per-pair sums by segment)."""
    lengths = torch.tensor([len(raw_a) // dtype.itemsize for _, raw_a, _ in batch])
    flat_a = torch.frombuffer(bytearray(b"".join(r for _, r, _ in batch)), dtype=dtype).to(torch.float64)
    flat_b = torch.frombuffer(bytearray(b"".join(r for _, _, r in batch)), dtype=dtype).to(torch.float64)
    segment = torch.repeat_interleave(torch.arange(len(batch)), lengths)
    delta = (flat_b - flat_a).abs()
    zeros = torch.zeros(len(batch), dtype=torch.float64)
    diff_sq = zeros.index_add(0, segment, delta.square()).tolist()
    norm_sq = zeros.index_add(0, segment, flat_a.square()).tolist()
    max_abs = zeros.scatter_reduce(0, segment, delta, "amax").tolist()
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
    if t.is_complex():
        return t.to(torch.complex128)
    return t.to(torch.float64)


@functools.cache
def _dtype(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


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
