"""In a torch.distributed job every rank resumes, only rank 0 writes, and every rank follows
rank 0's early-stopping decision."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ladle
from tests.conftest import SCRIPTS


@pytest.mark.slow
def test_two_ddp_ranks_share_one_run_and_only_rank_zero_writes(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(SCRIPTS / "ddp_two_ranks.py"), str(tmp_path / "run"), str(tmp_path / "init")],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = sorted(result.stdout.split("\n"))
    assert "rank 0 leg 0 resumed 0 writer True" in lines
    assert "rank 1 leg 0 resumed 0 writer False" in lines
    assert "rank 0 leg 1 resumed 4 writer True" in lines
    assert "rank 1 leg 1 resumed 4 writer False" in lines
    assert [c.step for c in ladle.Run(tmp_path / "run").checkpoints()] == [2, 4, 6, 8]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["fsdp", "ddp"])
def test_ranks_whose_metrics_disagree_stop_together_on_rank_zeros_decision(tmp_path: Path, mode: str) -> None:
    # Rank 1's own losses would stop it three epochs early: alone, under DDP it would leave rank 0
    # waiting in the next all-reduce, and under FSDP2 restoring the best checkpoint (a collective
    # DCP read) on one rank aborts the job. Both follow rank 0.
    out = tmp_path / "out"
    out.mkdir()
    done = subprocess.run(
        [sys.executable, str(SCRIPTS / "early_stop_two_ranks.py"), str(tmp_path / "run"), str(out), mode],
        capture_output=True,
        text=True,
        timeout=120,  # a rank left waiting in a collective hangs: fail instead
    )
    assert done.returncode == 0, done.stderr[-2000:]
    ranks = [json.loads((out / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert [r["stopped_at"] for r in ranks] == [5, 5]
    assert ranks[0]["state"] == ranks[1]["state"]
    assert ranks[0]["state"]["best_epoch"] == 3 and ranks[0]["best_step"] == 4
    best = ladle.Run(tmp_path / "run").best()
    assert best is not None and best.step == 4
    with ladle.load_source(best.path) as source:  # the weights both ranks went back to
        for key, value in ranks[1]["weights"].items():
            assert torch.equal(source.tensor(key), torch.tensor(value)), key
