"""Bit-exact resume, in real processes: stopping at step k and resuming changes nothing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import SCRIPTS

TOTAL = 20  # 2N steps; 7 batches per epoch, so epochs end at steps 7 and 14


def run_script(*args: str) -> None:
    subprocess.run(
        [sys.executable, str(SCRIPTS / "train_tiny.py"), *args],
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("straight")
    out = tmp / "out.pt"
    run_script(str(tmp / "run"), str(out), "--total", str(TOTAL))
    return torch.load(out, weights_only=True)


def _assert_identical(a: dict, b: dict) -> None:
    assert torch.equal(a["losses"], b["losses"]), (a["losses"], b["losses"])
    for key in a["params"]:
        assert torch.equal(a["params"][key], b["params"][key]), key
    state_a, state_b = a["optimizer"]["state"], b["optimizer"]["state"]
    assert state_a.keys() == state_b.keys()
    for index in state_a:
        for name, value in state_a[index].items():
            assert torch.equal(value, state_b[index][name]), (index, name)
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]


@pytest.mark.slow
@pytest.mark.parametrize("stop_at", [3, 7, 10, 15])
def test_stop_and_resume_in_a_new_process_matches_the_uninterrupted_run(
    tmp_path: Path, straight: dict, stop_at: int
) -> None:
    run_dir, out = tmp_path / "run", tmp_path / "out.pt"
    run_script(str(run_dir), str(out), "--total", str(TOTAL), "--stop-at", str(stop_at))
    assert not out.exists()
    run_script(str(run_dir), str(out), "--total", str(TOTAL))
    resumed = torch.load(out, weights_only=True)
    assert len(resumed["losses"]) == TOTAL
    _assert_identical(straight, resumed)


def test_the_uninterrupted_run_is_itself_deterministic(tmp_path: Path, straight: dict) -> None:
    out = tmp_path / "out.pt"
    run_script(str(tmp_path / "run"), str(out), "--total", str(TOTAL))
    _assert_identical(straight, torch.load(out, weights_only=True))
