"""In a torch.distributed job every rank resumes, and only rank 0 writes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

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
