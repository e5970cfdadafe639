"""`verify` checks the structure of a `state.pt` without torch: the zip container, a replay of
its pickle that runs nothing, and every tensor storage it names present and whole."""

from __future__ import annotations

import datetime
import zipfile
from pathlib import Path

import pytest
import torch

from ladle.errors import FormatError
from ladle.state.pickle_scan import _STORAGE_DTYPES, check_torch_archive


def _rewrite(src: Path, dst: Path, *, drop: str | None = None, cut: str | None = None) -> None:
    """A copy of the zip `src` with the member ending in `drop` left out or the one ending in `cut` halved."""
    with zipfile.ZipFile(src) as old, zipfile.ZipFile(dst, "w") as new:
        for info in old.infolist():
            data = old.read(info)
            if drop and info.filename.endswith(drop):
                continue
            if cut and info.filename.endswith(cut):
                data = data[: len(data) // 2]
            new.writestr(info, data)


def test_the_storage_table_matches_torchs() -> None:
    table = {
        name: str(d).removeprefix("torch.") for d, name in torch.storage._dtype_to_storage_type_map().items()
    }
    assert table == _STORAGE_DTYPES


def test_a_whole_file_passes_and_names_no_classes(tmp_path: Path) -> None:
    path = tmp_path / "state.pt"
    torch.save({"step": 3, "rng": torch.zeros(5, dtype=torch.uint8), "m": {"w": torch.ones(2, 2)}}, path)
    assert check_torch_archive(str(path)) == []


def test_a_missing_storage_is_damage(tmp_path: Path) -> None:
    torch.save({"a": torch.ones(3), "b": torch.ones(4)}, tmp_path / "ok.pt")
    _rewrite(tmp_path / "ok.pt", tmp_path / "bad.pt", drop="data/1")
    with pytest.raises(FormatError, match="storage 1 is missing"):
        check_torch_archive(str(tmp_path / "bad.pt"))


def test_a_short_storage_is_damage(tmp_path: Path) -> None:
    torch.save({"a": torch.ones(16)}, tmp_path / "ok.pt")
    _rewrite(tmp_path / "ok.pt", tmp_path / "bad.pt", cut="data/0")
    with pytest.raises(FormatError, match="holds 32 bytes, not 64"):
        check_torch_archive(str(tmp_path / "bad.pt"))


def test_classes_beyond_tensors_are_left_to_torchs_loader(tmp_path: Path) -> None:
    path = tmp_path / "state.pt"
    torch.save({"when": datetime.date(2024, 1, 2)}, path)
    assert "datetime.date" in (check_torch_archive(str(path)) or [])


def test_a_legacy_file_is_left_to_torchs_loader(tmp_path: Path) -> None:
    path = tmp_path / "old.pt"
    torch.save({"a": torch.ones(2)}, path, _use_new_zipfile_serialization=False)
    assert check_torch_archive(str(path)) is None
