"""ladle.integrations.argparse: seed-style --avg_ckpts/--num_ckpts flags for a user's script."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from ladle.integrations.argparse import add_averaging_args, averaged_model, averaged_state_dict
from ladle.store.run import Run


def _parser() -> argparse.ArgumentParser:
    return add_averaging_args(argparse.ArgumentParser(prog="train.py"))


@pytest.mark.parametrize(
    ("argv", "avg", "k"),
    [
        ([], False, 5),
        (["--avg_ckpts"], True, 5),
        (["--avg-ckpts", "--num-ckpts", "3"], True, 3),
        (["--avg_ckpts", "--num_ckpts", "2"], True, 2),
    ],
)
def test_both_spellings_parse(argv: list[str], avg: bool, k: int) -> None:
    args = _parser().parse_args(argv)
    assert (args.avg_ckpts, args.num_ckpts) == (avg, k)


def test_num_ckpts_must_be_positive(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        _parser().parse_args(["--num_ckpts", "0"])
    assert exc.value.code == 2
    assert "0 must be at least 1" in capsys.readouterr().err


def _run(path: Path) -> Run:
    run = Run(path, create=True).acquire()
    for i, (value, loss) in enumerate([(1.0, 0.9), (2.0, 0.2), (4.0, 0.5), (8.0, 0.1)], start=1):
        pending = run.begin(f"step-{i:09d}")
        pending.write("model.safetensors", lambda p, v=value: save_file({"weight": torch.tensor([[v]])}, p))
        pending.commit(step=i, metrics={"val_loss": loss}, monitor={"metric": "val_loss", "mode": "min"})
    run.release()
    return run


def test_avg_ckpts_loads_the_top_k_by_the_runs_monitor(tmp_path: Path) -> None:
    run = _run(tmp_path / "run")
    args = _parser().parse_args(["--avg_ckpts", "--num_ckpts", "2"])
    model = nn.Linear(1, 1, bias=False)
    assert averaged_model(args, run, model) is model
    assert model.weight.tolist() == [[5.0]]  # val_loss 0.1 (8.0) and 0.2 (2.0)


def test_without_the_flag_nothing_changes(tmp_path: Path) -> None:
    run = _run(tmp_path / "run")
    args = _parser().parse_args([])
    model = nn.Linear(1, 1, bias=False)
    before = model.weight.detach().clone()
    assert averaged_state_dict(args, run) is None
    assert torch.equal(averaged_model(args, run, model).weight.detach(), before)
