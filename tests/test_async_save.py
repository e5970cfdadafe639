"""Asynchronous saves: the state at the call is committed in the background, errors surface later."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import ladle
from ladle.saving.async_save import BackgroundSaveError, stage
from ladle.store.commit import PendingCheckpoint
from ladle.store.history import read_history
from tests.conftest import tiny_model, train_steps


def _manager(tmp_path: Path, model: nn.Module, **kwargs: object) -> ladle.CheckpointManager:
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    return ladle.CheckpointManager(
        tmp_path / "run", model=model, optimizer=optimizer, async_save=True, **kwargs
    )


def test_the_committed_checkpoint_holds_the_parameters_at_the_call(tmp_path: Path) -> None:
    model = tiny_model()
    with _manager(tmp_path, model) as manager:
        at_call = {k: v.clone() for k, v in model.state_dict().items()}
        assert manager.save(step=1) is None  # returned before the commit
        with torch.no_grad():
            for p in model.parameters():
                p.add_(100.0)  # training goes on while the background thread writes
        manager.wait()
        latest = manager.latest
    assert latest is not None and latest.step == 1
    saved = load_file(latest.file("model.safetensors"))
    for key, value in at_call.items():
        assert torch.equal(saved[key], value), key


def test_a_failing_background_write_surfaces_on_the_next_call_naming_the_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_space(self: PendingCheckpoint, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    model = tiny_model()
    manager = _manager(tmp_path, model, every_steps=1)
    monkeypatch.setattr(PendingCheckpoint, "commit", no_space)
    manager.step(1)
    while manager.engine.in_flight:  # let it fail
        time.sleep(0.01)
    with pytest.raises(BackgroundSaveError, match=r"checkpoint step-000000001 failed \(OSError.*No space"):
        manager.step(2)
    monkeypatch.undo()
    manager.close()
    assert [c.step for c in ladle.Run(tmp_path / "run").checkpoints()] == []


def test_close_waits_for_the_commit(tmp_path: Path) -> None:
    model = tiny_model()
    manager = _manager(tmp_path, model)
    manager.save(step=3)
    manager.close()
    assert [c.step for c in ladle.Run(tmp_path / "run").checkpoints()] == [3]


def test_saves_commit_one_at_a_time_in_order(tmp_path: Path) -> None:
    model = tiny_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with ladle.CheckpointManager(
        tmp_path / "run", model=model, optimizer=optimizer, every_steps=1, async_save=True
    ) as manager:
        for step in range(1, 6):
            train_steps(model, optimizer, 1, seed=step)
            manager.step(step)
    run = ladle.Run(tmp_path / "run")
    assert [c.step for c in sorted(run.checkpoints(), key=lambda c: c.seq)] == [1, 2, 3, 4, 5]
    assert run.verify() == []


def test_a_resumed_run_matches_the_synchronous_one(tmp_path: Path) -> None:
    states = []
    for mode in (False, True):
        model = tiny_model()
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
        run = tmp_path / f"run-{mode}"
        with ladle.CheckpointManager(run, model=model, optimizer=optimizer, async_save=mode) as manager:
            train_steps(model, optimizer, 3)
            manager.save(step=3)
            train_steps(model, optimizer, 3, seed=9)  # changes after the call are not saved
        fresh = tiny_model(seed=5)
        with ladle.CheckpointManager(run, model=fresh, optimizer=torch.optim.AdamW(fresh.parameters())) as m:
            m.resume()
        states.append(fresh.state_dict())
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), key


def test_a_save_on_sigterm_is_synchronous(tmp_path: Path) -> None:
    model = tiny_model()
    manager = _manager(tmp_path, model, save_on_signal=True, every_steps=10**6)
    os.kill(os.getpid(), signal.SIGTERM)
    with pytest.raises(SystemExit):
        manager.step(7)
    # Committed before step() raised: nothing is left in flight.
    assert [c.step for c in ladle.Run(tmp_path / "run").checkpoints()] == [7]


def test_staging_copies_tensors_and_keeps_ties() -> None:
    shared = torch.ones(3)
    state = {"a": shared, "b": shared, "nested": [{"c": torch.zeros(2)}], "n": 4}
    staged = stage(state)
    shared.add_(1)
    assert staged["a"].tolist() == [1.0, 1.0, 1.0]
    assert staged["a"] is staged["b"]
    assert staged["n"] == 4 and staged["nested"][0]["c"].tolist() == [0.0, 0.0]


def test_metrics_reported_while_saves_commit_in_the_background_reach_every_record_and_the_history(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    commit = PendingCheckpoint.commit

    def slow_commit(self: PendingCheckpoint, **kwargs: object) -> object:
        time.sleep(0.005)  # the loop reports the step's evaluation while its save commits
        return commit(self, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(PendingCheckpoint, "commit", slow_commit)
    model = tiny_model()
    steps = range(1, 31)
    with _manager(tmp_path, model, every_steps=1) as manager:
        for step in steps:
            manager.step(step, metrics={"loss": float(step)})  # saves in the background
            manager.epoch_end(step - 1, metrics={"val_loss": step / 10})  # at the step being saved
        reported = list(manager.history)
    run = ladle.Run(tmp_path / "run")
    records = {c.step: c.metrics for c in run.checkpoints()}
    assert records == {s: {"loss": float(s), "val_loss": s / 10} for s in steps}
    index = json.loads((tmp_path / "run" / "ladle.json").read_text())
    assert {c["step"]: c["metrics"] for c in index["checkpoints"]} == records
    expected = [e for s in steps for e in ({"loss": float(s)}, {"val_loss": s / 10})]
    assert [e["metrics"] for e in reported] == expected
    assert [e["metrics"] for e in read_history(run)] == expected
