"""Small tensors are compared by their stored bytes and measured in batches (numpy), and
give the figures the per-tensor path (torch) gives, for every dtype that is batched."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import ladle
from ladle.formats.source import DictSource
from ladle.tools.diff import diff_sources


@pytest.mark.parametrize(
    "dtype", [torch.bfloat16, torch.float16, torch.float64, torch.int32, torch.uint8, torch.bool]
)
def test_batched_figures_match_the_per_tensor_ones(tmp_path: Path, dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(1)
    a = {f"t{i}": (torch.randn(i % 5, generator=generator) * 50).to(dtype) for i in range(60)}  # some empty
    changed = (lambda v: ~v) if dtype == torch.bool else (lambda v: (v.float() * 2 + 1).to(dtype))
    b = {k: (v if i % 3 == 0 else changed(v)) for i, (k, v) in enumerate(a.items())}
    if dtype.is_floating_point:
        b["t4"] = torch.full_like(b["t4"], float("nan"))
    save_file(a, tmp_path / "a.safetensors")
    save_file(b, tmp_path / "b.safetensors")
    with (
        ladle.load_source(tmp_path / "a.safetensors") as sa,
        ladle.load_source(tmp_path / "b.safetensors") as sb,
    ):
        batched = diff_sources(sa, sb, sort="name")
    one_by_one = diff_sources(DictSource(a), DictSource(b), sort="name")
    assert batched.identical == one_by_one.identical
    assert [c.name for c in batched.value_changes] == [c.name for c in one_by_one.value_changes]
    assert batched.value_changes, "the files differ"
    for x, y in zip(batched.value_changes, one_by_one.value_changes, strict=True):
        for field in ("l2", "relative", "max_abs"):
            assert getattr(x, field) == pytest.approx(getattr(y, field), rel=1e-12, nan_ok=True), (
                x.name,
                field,
            )


def test_header_infos_keep_the_torch_surface(tmp_path: Path) -> None:
    save_file(
        {"w": torch.zeros(2, 3, dtype=torch.bfloat16), "n": torch.zeros((), dtype=torch.int64)},
        tmp_path / "x.safetensors",
    )
    with ladle.load_source(tmp_path / "x.safetensors") as source:
        infos = source.infos()
        w = source.info("w")
    assert infos == {"n": source_info_of(torch.zeros((), dtype=torch.int64)), "w": w}
    assert (w.dims, w.dtype_name, w.numel, w.nbytes, w.is_floating_point) == ((2, 3), "bfloat16", 6, 12, True)
    shape, dtype = w
    assert (shape, dtype) == (torch.Size([2, 3]), torch.bfloat16) == (w.shape, w.dtype)


def source_info_of(t: torch.Tensor) -> ladle.formats.TensorInfo:
    return DictSource({"t": t}).info("t")
