"""Links and names: nothing is written or deleted through a symbolic link; names mean one thing."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import ladle
from ladle.errors import ConfigError, RunError
from ladle.store.layout import checkpoint_name
from ladle.store.lock import LOCK_NAME
from ladle.store.run import Run


def commit(run: Run, step: int, name: str | None = None) -> ladle.CheckpointInfo:
    pending = run.begin(name or checkpoint_name(step))
    pending.write("model.safetensors", lambda p: save_file({"w": torch.full((3,), float(step))}, p))
    return pending.commit(step=step)


def test_a_lock_file_that_is_a_link_is_refused_and_its_target_untouched(tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (tmp_path / "run" / LOCK_NAME).symlink_to(victim)
    with pytest.raises(RunError, match=r"\.lock: is a symbolic link, and ladle does not take the lock"):
        Run(tmp_path / "run").acquire()
    assert victim.read_text() == "precious"


def test_a_symlinked_checkpoint_loses_only_its_link_when_deleted(tmp_path: Path) -> None:
    run = Run(tmp_path / "run", create=True).acquire()
    elsewhere = Run(tmp_path / "other", create=True).acquire()
    target = commit(elsewhere, 7, "step-000000007")
    elsewhere.release()
    os.symlink(target.path, os.path.join(run.path, "step-000000007"))
    run.refresh()
    assert [c.step for c in run.checkpoints()] == [7]
    run.delete(["step-000000007"])
    assert not [n for n in os.listdir(run.path) if n.startswith(".trash-")]
    assert Path(target.file("model.safetensors")).is_file()  # the link's target is intact
    run.release()


def test_pinning_a_symlinked_checkpoint_is_refused(tmp_path: Path) -> None:
    run = Run(tmp_path / "run", create=True).acquire()
    elsewhere = Run(tmp_path / "other", create=True).acquire()
    target = commit(elsewhere, 7)
    elsewhere.release()
    os.symlink(target.path, os.path.join(run.path, target.name))
    run.refresh()
    with pytest.raises(RunError, match="is a symbolic link"):
        run.set_pinned(target.name)
    run.release()


@pytest.mark.parametrize("name", ["latest", "best", "2", "000123"])
def test_names_that_mean_a_role_or_a_step_are_refused(tmp_path: Path, name: str) -> None:
    run = Run(tmp_path / "run", create=True).acquire()
    with pytest.raises(ConfigError, match=rf"checkpoint name '{name}' is not allowed: RUN/{name} already"):
        run.begin(name)
    run.release()


@pytest.mark.parametrize("name", ["../escape", ".hidden", "a/b", "", "ladle.json", "history.jsonl"])
def test_names_that_are_not_plain_folder_names_are_refused(tmp_path: Path, name: str) -> None:
    run = Run(tmp_path / "run", create=True).acquire()
    with pytest.raises(ConfigError, match="is not allowed"):
        run.begin(name)
    run.release()


def test_a_soup_into_the_run_cannot_be_named_latest(tmp_path: Path, model) -> None:
    with ladle.CheckpointManager(tmp_path / "run", model=model, monitor="loss") as manager:
        manager.save(1, metrics={"loss": 1.0})
        manager.save(2, metrics={"loss": 0.5})
    with pytest.raises(ConfigError, match="'latest' is not allowed"):
        ladle.soup(tmp_path / "run", "last:2", into_run=True, name="latest")
    assert not (tmp_path / "run" / "latest").exists()


@pytest.mark.parametrize("path", ["", "   "])
def test_an_empty_run_path_is_refused(tmp_path: Path, model, path: str, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="is not allowed; use a run directory path"):
        Run(path, create=True)
    with pytest.raises(ConfigError, match="is not allowed; use a run directory path"):
        ladle.CheckpointManager(path, model=model)
    assert list(tmp_path.iterdir()) == []


def test_a_negative_step_is_refused(tmp_path: Path, model) -> None:
    with pytest.raises(ConfigError, match=r"step=-5 is not allowed; use an integer >= 0"):
        checkpoint_name(-5)
    with (
        ladle.CheckpointManager(tmp_path / "run", model=model, every_steps=1) as manager,
        pytest.raises(ConfigError, match=r"step=-5 is not allowed; use an integer >= 0"),
    ):
        manager.step(-5)
    assert not list((tmp_path / "run").glob("step-*"))
