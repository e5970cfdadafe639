"""Safetensors headers are validated the way the format specifies, before anything is trusted.

The reference is the safetensors library itself: for any header, ladle's reader
accepts the file exactly when `safe_open` can read every tensor of it.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

import ladle
from ladle.errors import FormatError
from ladle.formats.safetensors_header import read_header

ITEMSIZE = {"F32": 4, "F16": 2, "BF16": 2, "I64": 8, "U8": 1, "BOOL": 1, "F64": 8}
SETTINGS = settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def write_raw(path: Path, header: dict, data_len: int) -> Path:
    body = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(body)) + body + b"\0" * data_len)
    return path


def library_accepts(path: Path) -> bool:
    try:
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 - safe_open is not a dict
                handle.get_slice(key)
    except Exception:
        return False
    return True


def ladle_accepts(path: Path) -> bool:
    try:
        read_header(str(path))
    except FormatError:
        return False
    return True


@st.composite
def layouts(draw: st.DrawFn) -> tuple[dict, int]:
    """A header of 1-4 tensors laid out back to back, then perhaps nudged out of shape."""
    count = draw(st.integers(1, 4))
    header, position = {}, 0
    for i in range(count):
        dtype = draw(st.sampled_from(sorted(ITEMSIZE)))
        shape = draw(st.lists(st.integers(0, 4), max_size=3))
        numel = 1
        for d in shape:
            numel *= d
        end = position + numel * ITEMSIZE[dtype]
        header[f"t{i}"] = {"dtype": dtype, "shape": shape, "data_offsets": [position, end]}
        position = end
    data_len = position
    key = draw(st.sampled_from(sorted(header)))
    entry = header[key]
    mutation = draw(st.sampled_from(["none", "begin", "end", "shape", "data_len", "huge"]))
    delta = draw(st.integers(-3, 3))
    if mutation == "begin":
        entry["data_offsets"][0] = max(0, entry["data_offsets"][0] + delta)
    elif mutation == "end":
        entry["data_offsets"][1] = max(0, entry["data_offsets"][1] + delta)
    elif mutation == "shape":
        entry["shape"] = [*entry["shape"], draw(st.integers(0, 3))]
    elif mutation == "data_len":
        data_len = max(0, data_len + delta)
    elif mutation == "huge":
        entry["shape"] = [2**62, 2**62, 0]
        entry["data_offsets"][1] = entry["data_offsets"][0]
    return header, data_len


@SETTINGS
@given(layout=layouts())
def test_ladle_accepts_a_header_exactly_when_the_safetensors_library_does(
    tmp_path: Path, layout: tuple[dict, int]
) -> None:
    header, data_len = layout
    path = write_raw(tmp_path / "x.safetensors", header, data_len)
    assert ladle_accepts(path) == library_accepts(path), json.dumps(header)


@SETTINGS
@given(
    tensors=st.dictionaries(
        st.text("abcdef.", min_size=1, max_size=6),
        st.tuples(
            st.sampled_from([torch.float32, torch.float16, torch.int64, torch.uint8, torch.bool]),
            st.lists(st.integers(0, 3), max_size=3),
        ),
        min_size=1,
        max_size=5,
    )
)
def test_every_file_the_library_writes_is_accepted(tmp_path: Path, tensors: dict) -> None:
    values = {k: torch.zeros(shape, dtype=dtype) for k, (dtype, shape) in tensors.items()}
    path = tmp_path / "w.safetensors"
    save_file(values, str(path))
    _, entries, _ = read_header(str(path))
    assert set(entries) == set(values)


def test_overlapping_tensors_are_refused_by_every_reader(tmp_path: Path) -> None:
    header = {
        "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
    }
    path = write_raw(tmp_path / "x.safetensors", header, 12)
    with pytest.raises(FormatError, match=r"x\.safetensors: tensor 'b' overlaps tensor 'a'"):
        ladle.load_source(path)
    with pytest.raises(FormatError, match="overlaps"):
        ladle.inspect_checkpoint(path)


def test_an_impossible_shape_is_one_line_not_a_crash(tmp_path: Path) -> None:
    header = {"a": {"dtype": "F32", "shape": [2**62, 2**62, 0], "data_offsets": [0, 0]}}
    path = write_raw(tmp_path / "x.safetensors", header, 0)
    with pytest.raises(FormatError, match=r"tensor 'a' has an impossible shape") as caught:
        ladle.load_source(path)
    assert "\n" not in str(caught.value)


def test_bytes_after_the_last_tensor_are_refused(tmp_path: Path) -> None:
    header = {"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}
    path = write_raw(tmp_path / "x.safetensors", header, 8)
    with pytest.raises(FormatError, match="4 bytes after the last tensor"):
        ladle.load_source(path)
