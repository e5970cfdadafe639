"""ladle.averaging.members: what a user names (files, globs, folders, runs) -> members of an average."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ladle import average, average_to_file
from ladle.averaging.members import open_members
from ladle.errors import CheckpointNotFound
from tests.conftest import scalar_run as _run


def _st(path: Path, tensors: dict[str, torch.Tensor], **metadata: str) -> Path:
    save_file(tensors, str(path), metadata=metadata or None)
    return path


def _files(tmp_path: Path, *values: list[float], dtype: torch.dtype = torch.float32) -> list[Path]:
    return [
        _st(tmp_path / f"c{i}.safetensors", {"w": torch.tensor(v, dtype=dtype)}) for i, v in enumerate(values)
    ]


def test_same_file_twice_counts_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    a, b = _files(tmp_path, [0.0], [3.0])
    with caplog.at_level(logging.WARNING, logger="ladle"):
        out = average([a, a, b])
    assert out["w"].tolist() == [1.5]
    assert "c0.safetensors is given twice; counting it once" in caplog.text


def test_hard_links_count_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    a, b = _files(tmp_path, [0.0], [3.0])
    os.link(a, tmp_path / "best.safetensors")
    with caplog.at_level(logging.WARNING, logger="ladle"):
        out = average([a, tmp_path / "best.safetensors", b])
    assert out["w"].tolist() == [1.5]
    assert "best.safetensors is the same file as" in caplog.text


def test_duplicates_can_be_kept_on_request(tmp_path: Path) -> None:
    a, b = _files(tmp_path, [0.0], [3.0])
    assert average([a, a, b], dedupe=False)["w"].tolist() == [1.0]


def test_identical_copies_are_both_counted_with_a_notice(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    a, b = _files(tmp_path, [0.0], [3.0])
    copy = tmp_path / "copy.safetensors"
    copy.write_bytes(a.read_bytes())
    with caplog.at_level(logging.WARNING, logger="ladle"):
        average_to_file([a, copy, b], tmp_path / "out.safetensors")
    assert "has the same contents as" in caplog.text
    assert load_file(str(tmp_path / "out.safetensors"))["w"].tolist() == [1.0]


def test_globs_expand_in_natural_order(tmp_path: Path) -> None:
    for i in (1, 2, 10):
        _st(tmp_path / f"ckpt_{i}.safetensors", {"w": torch.tensor([float(i)])})
    members = open_members([str(tmp_path / "ckpt_*.safetensors")])
    assert [Path(m.label).name for m in members] == [
        "ckpt_1.safetensors",
        "ckpt_2.safetensors",
        "ckpt_10.safetensors",
    ]
    for m in members:
        m.close()


def test_a_folder_of_checkpoints_expands(tmp_path: Path) -> None:
    folder = tmp_path / "ckpts"
    folder.mkdir()
    _st(folder / "a.safetensors", {"w": torch.tensor([1.0])})
    torch.save({"w": torch.tensor([5.0])}, folder / "b.pt")
    (folder / "notes.txt").write_text("not a checkpoint")
    assert average([folder])["w"].tolist() == [3.0]


def test_glob_without_matches_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(CheckpointNotFound, match=r"\*\.pt: the pattern matches nothing"):
        average([str(tmp_path / "*.pt")])


def test_a_run_expands_to_its_checkpoints_and_run_at_ref_picks_one(tmp_path: Path) -> None:
    _run(tmp_path, [1.0, 2.0, 6.0])
    assert average([tmp_path / "run"])["w"].tolist() == [3.0]
    assert average([f"{tmp_path / 'run'}@100", f"{tmp_path / 'run'}@step-000000300"])["w"].tolist() == [3.5]
    assert average([tmp_path / "run"])["n"].item() == 3  # newest by step
