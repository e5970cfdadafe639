"""Two checkpoints of one model (byte-identical safetensors headers) share one parsed header
and are diffed range by range; the answer is the one the key-by-key comparison gives."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import ladle
from ladle.errors import FormatError
from ladle.formats.source import DictSource
from ladle.tools import diff as diff_module
from ladle.tools.diff import Diff, diff_sources


def assert_same(got: Diff, want: Diff) -> None:
    """Everything a diff reports agrees; the figures to rounding (numpy and torch sum in other orders)."""
    a, b = got.to_dict(), want.to_dict()
    for side in (a, b):
        del side["a"], side["b"], side["summary"]
    changes = ("shape_changes", "dtype_changes", "value_changes")
    assert {k: v for k, v in a.items() if k not in changes} == {
        k: v for k, v in b.items() if k not in changes
    }
    for kind in changes:
        assert [c["name"] for c in a[kind]] == [c["name"] for c in b[kind]], kind
        for x, y in zip(a[kind], b[kind], strict=True):
            for field, value in x.items():
                if isinstance(value, float):
                    assert value == pytest.approx(y[field], rel=1e-9, nan_ok=True), (x["name"], field)
                else:
                    assert value == y[field], (x["name"], field)


def diff_files(a: Path, b: Path, **options: object) -> Diff:
    """The range-by-range answer (the two files must share their layout)."""
    with ladle.load_source(a) as sa, ladle.load_source(b) as sb:
        layout_a, layout_b = sa.stored_layout(), sb.stored_layout()
        assert layout_a is not None and layout_b is not None and layout_a.token is layout_b.token
        return diff_sources(sa, sb, **options)  # type: ignore[arg-type]


def diff_in_memory(a: Path, b: Path, **options: object) -> Diff:
    """The key-by-key answer: the same tensors, held in memory (no file layout to share)."""
    with ladle.load_source(a) as sa, ladle.load_source(b) as sb:
        da, db = DictSource(sa.state_dict()), DictSource(sb.state_dict())
    return diff_sources(da, db, **options)  # type: ignore[arg-type]


def test_files_with_the_same_header_share_it_and_others_do_not(tmp_path: Path) -> None:
    save_file({"w": torch.zeros(3), "b": torch.zeros(2)}, tmp_path / "a.safetensors")
    save_file({"w": torch.ones(3), "b": torch.ones(2)}, tmp_path / "b.safetensors")
    save_file({"w": torch.ones(4), "b": torch.ones(2)}, tmp_path / "c.safetensors")
    with (
        ladle.load_source(tmp_path / "a.safetensors") as a,
        ladle.load_source(tmp_path / "b.safetensors") as b,
        ladle.load_source(tmp_path / "c.safetensors") as c,
    ):
        layout_a, layout_b, layout_c = a.stored_layout(), b.stored_layout(), c.stored_layout()
        assert layout_a is not None and layout_b is not None and layout_c is not None
        assert layout_a.token is layout_b.token
        assert layout_c.token is not layout_a.token
        assert list(layout_a.keys) == a.keys()


def test_a_truncated_copy_with_the_same_header_is_refused_by_name(tmp_path: Path) -> None:
    save_file({"w": torch.arange(1000.0)}, tmp_path / "a.safetensors")
    shutil.copy(tmp_path / "a.safetensors", tmp_path / "b.safetensors")
    with open(tmp_path / "b.safetensors", "r+b") as handle:
        handle.truncate((tmp_path / "b.safetensors").stat().st_size - 8)
    with ladle.load_source(tmp_path / "a.safetensors"), pytest.raises(FormatError, match="b.safetensors"):
        ladle.load_source(tmp_path / "b.safetensors")


def test_only_the_tensors_whose_bytes_differ_are_reported(tmp_path: Path) -> None:
    generator = torch.Generator().manual_seed(0)
    a = {f"t{i}": torch.randn(i % 7, generator=generator) for i in range(300)}  # some empty
    b = dict(a)
    for i in (1, 150, 299):
        b[f"t{i}"] = a[f"t{i}"] + 1
    b["t8"] = a["t8"].clone()
    b["t8"][0] = -0.0 if a["t8"][0] == 0 else a["t8"][0]  # the same bits: not a change
    save_file(a, tmp_path / "a.safetensors")
    save_file(b, tmp_path / "b.safetensors")
    result = diff_files(tmp_path / "a.safetensors", tmp_path / "b.safetensors", sort="name")
    assert [c.name for c in result.value_changes] == ["t1", "t150", "t299"]
    assert result.identical == 297
    assert_same(result, diff_in_memory(tmp_path / "a.safetensors", tmp_path / "b.safetensors", sort="name"))


def test_tied_names_differ_exactly_when_their_tensor_does(tmp_path: Path) -> None:
    aliases = {"ladle.aliases": json.dumps({"head.weight": "embed.weight"})}
    save_file(
        {"embed.weight": torch.zeros(4, 2), "bias": torch.zeros(2)}, tmp_path / "a.safetensors", aliases
    )
    save_file({"embed.weight": torch.ones(4, 2), "bias": torch.zeros(2)}, tmp_path / "b.safetensors", aliases)
    result = diff_files(tmp_path / "a.safetensors", tmp_path / "b.safetensors", sort="name")
    assert [c.name for c in result.value_changes] == ["embed.weight", "head.weight"]
    assert result.identical == 1


def test_ranges_larger_than_one_read_and_tensors_larger_than_a_range(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(diff_module, "_RANGE_BYTES", 64)  # 16 float32 values per comparison
    generator = torch.Generator().manual_seed(3)
    a = {f"t{i}": torch.randn(size, generator=generator) for i, size in enumerate([3, 40, 5, 0, 16, 17, 2])}
    b = {k: (v * 3 if k in ("t1", "t5", "t6") else v) for k, v in a.items()}
    save_file(a, tmp_path / "a.safetensors")
    save_file(b, tmp_path / "b.safetensors")
    result = diff_files(tmp_path / "a.safetensors", tmp_path / "b.safetensors", sort="name")
    assert [c.name for c in result.value_changes] == ["t1", "t5", "t6"]
    assert_same(result, diff_in_memory(tmp_path / "a.safetensors", tmp_path / "b.safetensors", sort="name"))


DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.uint8, torch.bool, torch.complex64]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    tensors=st.lists(
        st.tuples(st.sampled_from(DTYPES), st.integers(0, 40), st.booleans(), st.integers(0, 39)),
        min_size=1,
        max_size=30,
    ),
    atol=st.sampled_from([0.0, 0.5]),
    range_bytes=st.sampled_from([16, 100, 1 << 24]),
)
def test_the_range_comparison_answers_what_the_key_by_key_one_does(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    tensors: list[tuple[torch.dtype, int, bool, int]],
    atol: float,
    range_bytes: int,
) -> None:
    monkeypatch.setattr(diff_module, "_RANGE_BYTES", range_bytes)
    generator = torch.Generator().manual_seed(len(tensors))
    a, b = {}, {}
    for i, (dtype, size, change, where) in enumerate(tensors):
        values = (torch.randn(size, generator=generator) * 10).to(dtype)
        a[f"k{i}"] = values
        changed = values.clone()
        if change and size:
            spot = where % size
            changed[spot] = ~changed[spot] if dtype == torch.bool else changed[spot] + 1
        b[f"k{i}"] = changed
    save_file(a, tmp_path / "a.safetensors")
    save_file(b, tmp_path / "b.safetensors")
    got = diff_files(tmp_path / "a.safetensors", tmp_path / "b.safetensors", atol=atol, sort="name")
    want = diff_in_memory(tmp_path / "a.safetensors", tmp_path / "b.safetensors", atol=atol, sort="name")
    assert_same(got, want)
