"""The one save engine: trigger polling on an injected clock, commits, superseding, retention,
metric recording, the monitor check and the log lines, as the manager and the integrations see them."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

import ladle
from ladle.errors import ConfigError, RunError
from ladle.policies.rules import SaveRules
from ladle.saving.engine import SaveEngine, SaveRequest


def text_file(content: str):
    def write(path: str) -> None:
        Path(path).write_text(content)

    return write


def request(name: str, step: int, metrics=None, trigger="test") -> SaveRequest:
    return SaveRequest(
        name=name,
        files=[("a.txt", text_file(name))],
        step=step,
        epoch=0,
        metrics=metrics or {},
        trigger=trigger,
    )


@pytest.fixture
def clock() -> list[float]:
    return [1000.0]


def engine(tmp_path: Path, clock: list[float] | None = None, **rules) -> SaveEngine:
    now = (lambda: clock[0]) if clock is not None else None
    built = SaveEngine(tmp_path / "run", SaveRules(**rules), **({"clock": now} if now else {}))
    built.open()
    return built


def test_a_wall_time_trigger_reads_the_injected_clock(tmp_path: Path, clock) -> None:
    writer = engine(tmp_path, clock, every_seconds=60)
    clock[0] += 59.5
    assert writer.poll("step", 1, 0, {}) is None
    clock[0] += 1
    assert writer.poll("step", 2, 0, {}) == "EverySeconds(seconds=60): 60.5 s since the last save"
    writer.save(request("step-2", 2))
    assert writer.poll("step", 3, 0, {}) is None  # the save reset the clock
    writer.close()


def test_every_trigger_sees_every_event_and_the_reason_names_all_that_fired(tmp_path: Path) -> None:
    writer = engine(tmp_path, every_steps=2, monitor="acc", mode="max", on_improvement=True)
    assert writer.poll("step", 1, 0, {"acc": 0.5}) == "OnImprovement: acc=0.5 is a new best (max)"
    reason = writer.poll("step", 2, 0, {"acc": 0.7})
    assert reason == "EverySteps(n=2): step 2; OnImprovement: acc=0.7 is a new best (max)"
    writer.close()


def test_the_reason_is_logged_at_debug_and_each_commit_at_info(tmp_path: Path, caplog) -> None:
    writer = engine(tmp_path, every_steps=5)
    with caplog.at_level(logging.DEBUG, logger="ladle"):
        reason = writer.poll("step", 5, 0, {})
        writer.save(request("step-5", 5, trigger=reason))
    debug = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
    info = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert "save due at step 5: EverySteps(n=5): step 5" in debug
    assert any(
        m.startswith("saved step-5 (EverySteps(n=5): step 5; 6 B in ") and " s) in " in m for m in info
    )
    writer.close()


def test_a_second_save_at_the_same_step_supersedes_the_first_once_committed(tmp_path: Path) -> None:
    writer = engine(tmp_path)
    writer.save(request("first", 3, {"loss": 1.0}))
    assert writer.already_saved(3, {"loss": 1.0})
    assert not writer.already_saved(3, {"loss": 1.0, "val": 2.0})
    writer.save(request("second", 3, {"loss": 1.0, "val": 2.0}))
    assert [c.name for c in writer.run.checkpoints()] == ["second"]
    writer.close()


def test_retention_runs_after_each_commit(tmp_path: Path) -> None:
    writer = engine(tmp_path, keep=2)
    for step in range(1, 5):
        writer.save(request(f"s{step}", step))
    assert [c.name for c in writer.run.checkpoints()] == ["s3", "s4"]
    writer.close()


def test_a_different_number_of_triggers_on_resume_warns_and_starts_them_fresh(tmp_path: Path, caplog) -> None:
    saved = engine(tmp_path, monitor="loss", on_improvement=True)
    saved.poll("step", 1, 0, {"loss": 0.5})
    state = saved.state_dict()
    saved.close()
    resumed = engine(tmp_path, monitor="loss", on_improvement=True, every_steps=100)
    with caplog.at_level(logging.WARNING, logger="ladle"):
        resumed.load_state_dict(state)
    assert (
        "holds the state of 1 triggers (OnImprovement) but 2 are configured (EverySteps, OnImprovement); "
        "triggers start fresh"
    ) in caplog.text
    assert resumed.poll("step", 2, 0, {"loss": 0.9}) is not None  # fresh: 0.9 is a first best
    resumed.close()


def test_the_manager_warns_about_a_trigger_count_mismatch_like_the_integrations(
    tmp_path: Path, model, caplog
) -> None:
    with ladle.CheckpointManager(tmp_path / "run", model=model, every_steps=1) as manager:
        manager.step(1)
    with ladle.CheckpointManager(tmp_path / "run", model=model, every_steps=1, every_epochs=1) as manager:
        with caplog.at_level(logging.WARNING, logger="ladle"):
            manager.resume()
    assert "triggers start fresh" in caplog.text


def test_triggers_of_another_kind_start_fresh_too(tmp_path: Path, caplog) -> None:
    saved = engine(tmp_path, monitor="loss", on_improvement=True)
    saved.poll("step", 1, 0, {"loss": 0.5})
    state = saved.state_dict()
    saved.close()
    resumed = engine(tmp_path, monitor="loss", thresholds=[0.7])
    with caplog.at_level(logging.WARNING, logger="ladle"):
        resumed.load_state_dict(state)
    assert "(OnImprovement) but 1 are configured (OnThreshold); triggers start fresh" in caplog.text
    resumed.close()


def test_the_first_save_without_the_monitored_metric_warns_once_naming_the_reported_ones(
    tmp_path: Path, model, caplog
) -> None:
    with (
        caplog.at_level(logging.WARNING, logger="ladle"),
        ladle.CheckpointManager(
            tmp_path / "run", model=model, monitor="val_accuracy", every_steps=1
        ) as manager,
    ):
        manager.step(1, metrics={"loss": 1.0})
        manager.epoch_end(0, step=1, metrics={"val_acc": 0.5})
        manager.step(2, metrics={"loss": 0.5})
    warnings = [r.getMessage() for r in caplog.records if "monitored metric" in r.getMessage()]
    assert len(warnings) == 1
    assert "'val_accuracy'" in warnings[0] and "loss" in warnings[0] and "check monitor=" in warnings[0]


def test_strict_monitor_refuses_a_save_without_it_once_an_evaluation_reported_others(
    tmp_path: Path, model
) -> None:
    rules = SaveRules(monitor="val_accuracy", every_epochs=1, strict_monitor=True)
    with ladle.CheckpointManager(tmp_path / "run", model=model, rules=rules) as manager:
        with pytest.raises(
            ConfigError, match=r"no monitored metric 'val_accuracy' \(metrics reported so far: val_acc"
        ):
            manager.epoch_end(0, step=1, metrics={"val_acc": 0.5})
        assert manager.run.checkpoints() == []  # refused before anything was committed


def test_retention_never_deletes_by_a_metric_nobody_reported(tmp_path: Path, model) -> None:
    keep = ladle.Keep(last=1, best=1)
    with ladle.CheckpointManager(tmp_path / "run", model=model, monitor="val_accuracy", keep=keep) as manager:
        for epoch in range(3):
            manager.epoch_end(epoch, step=epoch + 1, metrics={"val_acc": [0.5, 0.9, 0.7][epoch]})
        assert [c.step for c in manager.run.checkpoints()] == [1, 2, 3]
        assert manager.best is None


def test_metrics_reported_at_the_newest_checkpoints_step_reach_it(tmp_path: Path, model) -> None:
    from ladle.cli.ls import checkpoint_rows

    stopping = ladle.EarlyStopping(metric="val_loss", patience=10)
    with ladle.CheckpointManager(
        tmp_path / "run",
        model=model,
        every_steps=200,
        every_epochs=5,
        early_stopping=stopping,
        keep=ladle.Keep(last=1, best=1),
    ) as manager:
        for epoch, val in enumerate([0.9, 0.4, 0.6, 0.7]):
            step = (epoch + 1) * 200
            assert manager.step(step, metrics={"loss": 1.0}) is not None  # saved before the evaluation
            assert manager.epoch_end(epoch, step=step, metrics={"val_loss": val}) is None
        best = manager.best
        assert best is not None and best.step == 400 and best.metrics == {"loss": 1.0, "val_loss": 0.4}
        assert stopping.best_epoch == 1 and stopping.best == best.metrics["val_loss"]
        rows = checkpoint_rows(ladle.Run(tmp_path / "run"))
        assert [r["name"] for r in rows if r["best"]] == [best.name]
    meta = json.loads((tmp_path / "run" / best.name / "meta.json").read_text())
    assert meta["metrics"] == {"loss": 1.0, "val_loss": 0.4}


def test_a_pending_checkpoint_commits_once(tmp_path: Path) -> None:
    run = ladle.Run(tmp_path / "run", create=True).acquire()
    pending = run.begin("one")
    pending.write("a.txt", text_file("x"))
    pending.commit(step=1)
    with pytest.raises(RunError, match="already committed or aborted"):
        pending.commit(step=1)
    assert [c.name for c in run.checkpoints()] == ["one"]
    run.release()


def test_engine_refuses_rules_that_are_not_save_rules(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"rules=\{'keep': 3\} is not allowed; use ladle.SaveRules"):
        SaveEngine(tmp_path / "run", {"keep": 3})  # type: ignore[arg-type]
