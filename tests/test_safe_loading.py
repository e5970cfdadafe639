"""Loading without `--trust`: the reviewed plain-data types (`ladle.formats.safe_globals`) load,
scoped to ladle's own loads; anything else is refused by name, and no command runs code from a file."""

from __future__ import annotations

import argparse
import datetime
import pathlib
from pathlib import Path

import numpy as np
import pytest
import torch

from ladle.cli.main import main
from ladle.errors import UnsafeLoad
from ladle.formats import load_source
from ladle.formats.safe_globals import ladle_safe_globals, weights_only_load
from tests.foreign_checkpoints import evil_checkpoint, timm_checkpoint, timm_model


def test_a_timm_checkpoint_with_a_namespace_loads_without_trust(tmp_path: Path) -> None:
    saved = timm_checkpoint(tmp_path / "checkpoint-0.pth.tar", 0)
    with pytest.raises(Exception, match="Weights only load failed"):
        torch.load(tmp_path / "checkpoint-0.pth.tar", weights_only=True)  # torch alone refuses it
    with load_source(tmp_path / "checkpoint-0.pth.tar") as source:
        assert torch.equal(source.tensor("3.weight"), saved["state_dict"]["3.weight"])


@pytest.mark.parametrize(
    "value",
    [
        argparse.Namespace(lr=0.1, layers=[1, 2]),
        pathlib.Path("/data/imagenet"),
        datetime.datetime(2026, 1, 2, 3, 4, tzinfo=datetime.timezone.utc),
        datetime.timedelta(seconds=90),
        np.float64(0.25),
        np.int64(7),
        np.arange(3.0),
    ],
    ids=["namespace", "path", "datetime", "timedelta", "np-float", "np-int", "np-array"],
)
def test_each_allowed_type_round_trips(tmp_path: Path, value: object) -> None:
    torch.save({"extra": value, "state_dict": {"w": torch.ones(1)}}, tmp_path / "f.pt")
    loaded = weights_only_load(str(tmp_path / "f.pt"))["extra"]
    assert type(loaded) is type(value)
    assert np.array_equal(loaded, value) if isinstance(value, np.ndarray) else loaded == value


def test_the_allow_list_is_lifted_after_each_load(tmp_path: Path) -> None:
    torch.save({"args": argparse.Namespace(lr=0.1)}, tmp_path / "f.pt")
    before = list(torch.serialization.get_safe_globals())
    weights_only_load(str(tmp_path / "f.pt"))
    after = torch.serialization.get_safe_globals()
    # (torch may register its own globals when a module is first imported during a load)
    assert all(g in after for g in before) and argparse.Namespace not in after
    with pytest.raises(Exception, match="Weights only load failed"):
        torch.load(tmp_path / "f.pt", weights_only=True)


def test_a_users_own_safe_globals_survive_a_ladle_load(tmp_path: Path) -> None:
    torch.serialization.add_safe_globals([argparse.Namespace])
    try:
        with ladle_safe_globals():
            pass
        assert argparse.Namespace in torch.serialization.get_safe_globals()
    finally:
        torch.serialization.clear_safe_globals()


def test_an_unknown_class_is_refused_by_name(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    evil_checkpoint(tmp_path / "evil.pt", marker)
    with pytest.raises(UnsafeLoad, match=r"builtins\.exec.*pass trust=True"):
        load_source(tmp_path / "evil.pt")
    assert not marker.exists()


def _evil_timm_folder(root: Path, marker: Path) -> Path:
    root.mkdir()
    (root / "summary.csv").write_text("epoch,eval_top1\n0,50\n1,60\n")
    evil_checkpoint(root / "checkpoint-0.pth.tar", marker, seed=0)
    evil_checkpoint(root / "checkpoint-1.pth.tar", marker, seed=1)
    return root


@pytest.mark.parametrize(
    "command",
    [
        ["inspect", "{a}"],
        ["inspect", "{a}", "--ema"],
        ["avg", "{a}", "{b}", "-o", "{out}"],
        ["diff", "{a}", "{b}"],
        ["export", "{a}", "-o", "{out}"],
        ["soup", "{dir}", "--recipe", "top:1:eval_top1:max", "-o", "{out}"],
        ["verify", "{dir}"],
        ["ls", "{dir}"],
    ],
    ids=lambda c: " ".join(c[:2]) if c[0] == "inspect" else c[0],
)
def test_no_command_runs_code_from_a_malicious_pickle(tmp_path: Path, command: list[str]) -> None:
    marker = tmp_path / "ran"
    folder = _evil_timm_folder(tmp_path / "timm", marker)
    names = {
        "a": str(folder / "checkpoint-0.pth.tar"),
        "b": str(folder / "checkpoint-1.pth.tar"),
        "dir": str(folder),
        "out": str(tmp_path / "out.safetensors"),
    }
    code = main([part.format(**names) for part in command])
    assert not marker.exists()
    assert code in (0, 1, 2)  # refused or described: never a crash, never the payload


def test_load_source_with_trust_is_the_only_way_the_payload_runs(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    evil_checkpoint(tmp_path / "evil.pt", marker)
    with load_source(tmp_path / "evil.pt", trust=True) as source:
        assert source.keys()[0] == "0.weight"
    assert marker.exists()  # proves the fixture is really malicious


def test_a_model_state_dict_alone_needs_nothing_extra(tmp_path: Path) -> None:
    torch.save(timm_model(0).state_dict(), tmp_path / "m.pt")
    with load_source(tmp_path / "m.pt") as source:
        assert "1.running_var" in source
