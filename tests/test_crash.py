"""Crash consistency: SIGKILL at random moments never leaves a run that lies."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import ladle
from tests.conftest import SCRIPTS

KILLS = 32


def start_looping_trainer(run_dir: Path, out: Path) -> tuple[subprocess.Popen[str], int]:
    process = subprocess.Popen(
        [
            sys.executable,
            str(SCRIPTS / "train_tiny.py"),
            str(run_dir),
            str(out),
            "--loop",
            "--ballast",
            "700",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert process.stdout is not None
    line = process.stdout.readline()
    if not line.startswith("ready"):
        process.kill()
        process.wait()
        process.stdout.close()
        raise AssertionError(f"trainer did not start: {line!r}")
    return process, int(line.split()[1])


@pytest.mark.slow
def test_sigkill_at_random_moments_leaves_only_loadable_verified_checkpoints(tmp_path: Path) -> None:
    rng = random.Random(20261121)
    run_dir, out = tmp_path / "run", tmp_path / "out.pt"
    newest_step = 0
    for kill in range(KILLS):
        process, resumed_step = start_looping_trainer(run_dir, out)
        # The newest committed checkpoint is the one the restarted trainer resumed from.
        assert resumed_step == newest_step, (
            f"kill {kill}: resumed at {resumed_step}, newest was {newest_step}"
        )
        time.sleep(rng.uniform(0.0, 0.4))
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
        process.stdout.close()  # type: ignore[union-attr]

        run = ladle.Run(run_dir)
        assert run.verify() == [], f"kill {kill}"
        for info in run.checkpoints():
            payload = torch.load(info.file("state.pt"), weights_only=True)
            assert payload["step"] == info.step
        latest = run.latest()
        if latest is not None:
            assert latest.step >= newest_step, f"kill {kill}: progress went backwards"
            newest_step = latest.step
    assert newest_step > 0, "no checkpoint was ever committed"
