"""One writer per run: a second writer is refused by name; a dead writer's lock is taken over."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import ladle
from ladle.store.run import Run

HOLD = """
import sys, time
from ladle.store.run import Run
run = Run(sys.argv[1], create=True).acquire()
print("locked", flush=True)
time.sleep(60)
"""


def hold_lock(run_dir: Path) -> subprocess.Popen[str]:
    process = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None and process.stdout.readline().strip() == "locked"
    return process


def test_a_second_writer_gets_an_error_naming_the_holder(tmp_path: Path) -> None:
    holder = hold_lock(tmp_path / "run")
    try:
        with pytest.raises(ladle.RunLocked, match=rf"pid {holder.pid} on host {socket.gethostname()}"):
            Run(tmp_path / "run").acquire()
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()  # type: ignore[union-attr]


def test_a_lock_left_by_a_killed_process_is_taken_over(tmp_path: Path) -> None:
    holder = hold_lock(tmp_path / "run")
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    holder.stdout.close()  # type: ignore[union-attr]
    run = Run(tmp_path / "run").acquire()
    assert run.writable
    run.release()


def test_two_managers_in_one_process_conflict(tmp_path: Path, model) -> None:
    with ladle.CheckpointManager(tmp_path / "run", model=model):
        with pytest.raises(ladle.RunLocked, match="open for writing"):
            ladle.CheckpointManager(tmp_path / "run", model=model)


def test_closing_releases_the_lock(tmp_path: Path, model) -> None:
    ladle.CheckpointManager(tmp_path / "run", model=model).close()
    with ladle.CheckpointManager(tmp_path / "run", model=model) as manager:
        assert manager.run.writable


def test_readers_need_no_lock(tmp_path: Path, model) -> None:
    with ladle.CheckpointManager(tmp_path / "run", model=model) as manager:
        manager.save(step=1)
        assert len(Run(tmp_path / "run")) == 1
