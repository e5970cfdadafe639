"""DCP folders (`.metadata` + `*.distcp`, as `dcp.save` writes them) read without a process group."""

from __future__ import annotations

import json
import os
import pickle
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from ladle.cli.main import main
from ladle.errors import FormatError
from ladle.formats import load_source
from ladle.formats.dcp import DcpSource


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))


def _dcp_save(state: dict, path: Path) -> Path:
    """What torchtitan or a user's own loop writes: a plain `dcp.save` of model and optimizer."""
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save(state, checkpoint_id=str(path), no_dist=True)
    return path


def _training_checkpoint(path: Path, seed: int) -> tuple[Path, dict[str, torch.Tensor]]:
    model = _model(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    _dcp_save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, path)
    return path, weights


def test_a_dcp_folder_opens_as_its_model_weights(tmp_path: Path) -> None:
    path, weights = _training_checkpoint(tmp_path / "step-30", 0)
    with load_source(path) as source:
        assert source.format == "dcp"
        assert sorted(source.keys()) == sorted(weights)
        assert source.step == 30
        for key, expected in weights.items():
            assert source.info(key) == (expected.shape, expected.dtype)
            assert torch.equal(source.tensor(key), expected)


def test_pieces_of_every_layout_read_back_exactly(tmp_path: Path) -> None:
    # Plain C-ordered pieces are read straight into place; views, transposed and empty
    # tensors, scalars and bf16 must come back the same whichever way they are read.
    stored = torch.arange(20.0)
    tensors = {
        "plain": torch.randn(6, 4),
        "view": stored[5:9],
        "transposed": torch.randn(6, 4).t(),
        "bf16": torch.randn(5).to(torch.bfloat16),
        "scalar": torch.tensor(3.0),
        "empty": torch.empty(0, 3),
    }
    with DcpSource(_dcp_save({"model": tensors}, tmp_path / "ckpt")) as source:
        for key, value in tensors.items():
            assert torch.equal(source.tensor(key), value), key


def test_key_picks_another_entry_of_the_saved_state(tmp_path: Path) -> None:
    path, _ = _training_checkpoint(tmp_path / "ckpt", 0)
    with load_source(path, key="optimizer") as source:
        assert "state.0.exp_avg" in source
        assert not any(k.startswith("param_groups") for k in source)


def test_a_flat_state_dict_is_read_whole(tmp_path: Path) -> None:
    weights = _model(1).state_dict()
    path = _dcp_save(dict(weights), tmp_path / "flat")
    with load_source(path) as source:
        assert sorted(source.keys()) == sorted(weights)
        assert torch.equal(source.tensor("2.bias"), weights["2.bias"])


def test_metadata_that_names_other_classes_is_refused_without_running_them(tmp_path: Path) -> None:
    path, _ = _training_checkpoint(tmp_path / "ckpt", 0)
    marker = tmp_path / "ran"
    with open(path / ".metadata", "wb") as handle:
        pickle.dump(_Boom(str(marker)), handle)
    with pytest.raises(FormatError, match=r"\.metadata: not plain DCP metadata .*refused global"):
        DcpSource(path)
    assert not marker.exists()


class _Boom:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.mkdir, (self.marker,))


def test_the_cli_inspects_a_dcp_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path, weights = _training_checkpoint(tmp_path / "ckpt", 0)
    assert main(["inspect", str(path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["format"] == "dcp"
    assert sorted(t["name"] for t in report["tensors"]) == sorted(weights)


def test_the_cli_averages_and_exports_dcp_folders(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a, wa = _training_checkpoint(tmp_path / "a", 0)
    b, wb = _training_checkpoint(tmp_path / "b", 1)
    out = tmp_path / "avg.safetensors"
    assert main(["avg", str(a), str(b), "-o", str(out)]) == 0
    averaged = load_file(str(out))
    for key in wa:
        torch.testing.assert_close(averaged[key], (wa[key] + wb[key]) / 2)
    exported = tmp_path / "a.safetensors"
    assert main(["export", str(a), "-o", str(exported)]) == 0
    assert {k: v.tolist() for k, v in load_file(str(exported)).items()} == {
        k: v.tolist() for k, v in wa.items()
    }


def test_a_folder_of_dcp_checkpoints_is_averaged_member_by_member(tmp_path: Path) -> None:
    _, wa = _training_checkpoint(tmp_path / "checkpoint" / "step-10", 0)
    _, wb = _training_checkpoint(tmp_path / "checkpoint" / "step-20", 1)
    out = tmp_path / "avg.safetensors"
    assert main(["avg", str(tmp_path / "checkpoint"), "-o", str(out)]) == 0
    torch.testing.assert_close(load_file(str(out))["0.weight"], (wa["0.weight"] + wb["0.weight"]) / 2)


def test_the_cli_verifies_a_dcp_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path, _ = _training_checkpoint(tmp_path / "ckpt", 0)
    assert main(["verify", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ok"] is True
    shard = next(path.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:-100])
    assert main(["verify", str(path), "--json"]) == 1
    problems = json.loads(capsys.readouterr().out)["checkpoints"][0]["problems"]
    assert any(shard.name in p for p in problems), problems


def test_the_cli_lists_a_folder_of_dcp_checkpoints(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _training_checkpoint(tmp_path / "checkpoint" / "step-10", 0)
    _training_checkpoint(tmp_path / "checkpoint" / "step-20", 1)
    assert main(["ls", str(tmp_path / "checkpoint"), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["checkpoints"]
    assert [(r["name"], r["step"]) for r in rows] == [("step-10", 10), ("step-20", 20)]


def test_no_command_answers_no_checkpoint_files_for_a_dcp_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path, _ = _training_checkpoint(tmp_path / "ckpt", 0)
    for argv in (["ls", str(path)], ["inspect", str(path)], ["verify", str(path)]):
        main(argv)
        captured = capsys.readouterr()
        assert "no checkpoint files" not in captured.out + captured.err
