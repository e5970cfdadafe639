"""Bit-exact resume, in real processes: stopping at step k and resuming changes nothing.

Each run is its own process, forked from a server that imported torch once (`ScriptServer`).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.conftest import ScriptServer

TOTAL = 20  # 2N steps; 7 batches per epoch, so epochs end at steps 7 and 14


@pytest.fixture(scope="module")
def run_script(train_tiny: ScriptServer):  # type: ignore[no-untyped-def]
    """`train_tiny.py ARGS` in its own (forked) process; fails unless it exits 0."""

    def run(*args: str) -> None:
        assert train_tiny.run(*args) == 0, args

    return run


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory, run_script) -> dict:  # type: ignore[no-untyped-def]
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
    tmp_path: Path, straight: dict, stop_at: int, run_script
) -> None:
    run_dir, out = tmp_path / "run", tmp_path / "out.pt"
    run_script(str(run_dir), str(out), "--total", str(TOTAL), "--stop-at", str(stop_at))
    assert not out.exists()
    run_script(str(run_dir), str(out), "--total", str(TOTAL))
    resumed = torch.load(out, weights_only=True)
    assert len(resumed["losses"]) == TOTAL
    _assert_identical(straight, resumed)


@pytest.mark.slow
def test_the_uninterrupted_run_is_itself_deterministic(tmp_path: Path, straight: dict, run_script) -> None:
    out = tmp_path / "out.pt"
    run_script(str(tmp_path / "run"), str(out), "--total", str(TOTAL))
    _assert_identical(straight, torch.load(out, weights_only=True))
