"""Crash consistency: SIGKILL at random moments never leaves a run that lies.

Every trainer is its own process (forked from one that imported torch once, `ScriptServer`),
killed with SIGKILL: the kernel closes its files and releases its lock as for any crash.
"""

from __future__ import annotations

import os
import random
import signal
import time
from pathlib import Path

import pytest
import torch

import ladle
from tests.conftest import ScriptServer

KILLS = 32


def start_looping_trainer(server: ScriptServer, run_dir: Path, out: Path, *extra: str) -> tuple[int, int]:
    """A trainer that saves every step forever (a forked process); its pid and the step it resumed at."""
    pid = server.start(str(run_dir), str(out), "--loop", "--ballast", "700", *extra)
    line = server.line()
    if not line.startswith("ready"):
        os.kill(pid, signal.SIGKILL)
        server.wait()
        raise AssertionError(f"trainer did not start: {line!r}")
    return pid, int(line.split()[1])


def sigkill(server: ScriptServer, pid: int) -> None:
    os.kill(pid, signal.SIGKILL)
    assert server.wait(timeout=30) == -signal.SIGKILL


@pytest.mark.slow
def test_sigkill_at_random_moments_leaves_only_loadable_verified_checkpoints(
    tmp_path: Path, train_tiny: ScriptServer
) -> None:
    rng = random.Random(20261121)
    run_dir, out = tmp_path / "run", tmp_path / "out.pt"
    newest_step = 0
    for kill in range(KILLS):
        pid, resumed_step = start_looping_trainer(train_tiny, run_dir, out)
        # The newest committed checkpoint is the one the restarted trainer resumed from.
        assert resumed_step == newest_step, (
            f"kill {kill}: resumed at {resumed_step}, newest was {newest_step}"
        )
        time.sleep(rng.uniform(0.0, 0.4))
        sigkill(train_tiny, pid)

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


@pytest.mark.slow
def test_sigkill_during_background_saves_leaves_only_loadable_verified_checkpoints(
    tmp_path: Path, train_tiny: ScriptServer
) -> None:
    """With async_save, a kill lands mostly inside a background write: nothing half-written is listed."""
    rng = random.Random(20261201)
    run_dir, out = tmp_path / "run", tmp_path / "out.pt"
    newest_step = 0
    for kill in range(KILLS // 4):
        pid, resumed_step = start_looping_trainer(train_tiny, run_dir, out, "--async-save")
        assert resumed_step == newest_step, (
            f"kill {kill}: resumed at {resumed_step}, newest was {newest_step}"
        )
        time.sleep(rng.uniform(0.0, 0.4))
        sigkill(train_tiny, pid)
        run = ladle.Run(run_dir)
        assert run.verify() == [], f"kill {kill}"
        for info in run.checkpoints():
            assert torch.load(info.file("state.pt"), weights_only=True)["step"] == info.step
        latest = run.latest()
        if latest is not None:
            assert latest.step >= newest_step, f"kill {kill}: progress went backwards"
            newest_step = latest.step
    assert newest_step > 0, "no checkpoint was ever committed"
