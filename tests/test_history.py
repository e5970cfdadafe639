"""The metrics history: appended per report, synced per save, resumed lineages kept apart."""

from __future__ import annotations

from pathlib import Path

import ladle
from ladle.store.history import HISTORY_LOG, parse_history, read_history


def losses(entries) -> list[float]:
    return [e["metrics"]["loss"] for e in entries]


def test_every_reported_metric_is_one_line_and_saves_do_not_rewrite_it(tmp_path: Path, model) -> None:
    with ladle.CheckpointManager(tmp_path / "run", model=model, every_steps=2) as manager:
        for step in range(1, 6):
            manager.step(step, metrics={"loss": float(step)})
        assert losses(manager.history) == [1, 2, 3, 4, 5]
        assert all("history.json" not in c.files for c in manager.run.checkpoints())
    assert losses(read_history(ladle.Run(tmp_path / "run"))) == [1, 2, 3, 4, 5]


def test_a_resumed_run_drops_the_interrupted_attempts_metrics(tmp_path: Path, model) -> None:
    with ladle.CheckpointManager(tmp_path / "run", model=model, every_steps=2) as manager:
        for step in range(1, 6):  # saved at 2 and 4; step 5 is lost with the crash
            manager.step(step, metrics={"loss": float(step)})
    with ladle.CheckpointManager(tmp_path / "run", model=model, every_steps=2) as manager:
        manager.resume()
        assert losses(manager.history) == [1, 2, 3, 4]
        manager.step(5, metrics={"loss": 50.0})
    assert losses(read_history(ladle.Run(tmp_path / "run"))) == [1, 2, 3, 4, 50]


def test_resuming_an_older_checkpoint_keeps_its_lineage_only(tmp_path: Path, model) -> None:
    with ladle.CheckpointManager(tmp_path / "run", model=model, every_steps=1) as manager:
        for step in range(1, 5):
            manager.step(step, metrics={"loss": float(step)})
    with ladle.CheckpointManager(tmp_path / "run", model=model, every_steps=1) as manager:
        manager.resume(2)
        manager.step(3, metrics={"loss": 30.0})
    assert losses(read_history(ladle.Run(tmp_path / "run"))) == [1, 2, 30]


def test_a_fresh_start_in_an_existing_run_starts_a_fresh_history(tmp_path: Path, model) -> None:
    with ladle.CheckpointManager(tmp_path / "run", model=model, every_steps=1) as manager:
        manager.step(1, metrics={"loss": 1.0})
    with ladle.CheckpointManager(tmp_path / "run", model=model, every_steps=1) as manager:
        manager.step(1, metrics={"loss": 9.0})
    assert losses(read_history(ladle.Run(tmp_path / "run"))) == [9]


def test_a_torn_last_line_is_skipped() -> None:
    lines = [b'{"kind": "step", "metrics": {"loss": 1}}', b'{"kind": "step", "metr']
    assert losses(parse_history(lines)) == [1]


def test_the_log_lives_beside_the_checkpoints(tmp_path: Path, model) -> None:
    with ladle.CheckpointManager(tmp_path / "run", model=model) as manager:
        manager.epoch_end(0, step=1, metrics={"loss": 1.0})
    assert (tmp_path / "run" / HISTORY_LOG).is_file()
    assert [c.name for c in ladle.Run(tmp_path / "run").checkpoints()] == ["step-000000001"]
