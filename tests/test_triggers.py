"""Triggers: each decides from one event whether to save; the manager saves when any fires."""

from __future__ import annotations

from pathlib import Path

import pytest

import ladle
from ladle.errors import ConfigError
from ladle.policies.triggers import Event, EveryEpochs, EverySeconds, EverySteps, OnImprovement, OnThreshold


def event(kind="step", step=1, epoch=0, metrics=None, seconds=0.0) -> Event:
    return Event(kind, step, epoch, metrics or {}, seconds)


@pytest.mark.parametrize(
    ("trigger", "evt", "fires"),
    [
        (EverySteps(n=5), event(step=10), True),
        (EverySteps(n=5), event(step=11), False),
        (EverySteps(n=5), event(kind="epoch", step=10), False),
        (EveryEpochs(n=2), event(kind="epoch", epoch=1), True),
        (EveryEpochs(n=2), event(kind="epoch", epoch=2), False),
        (EveryEpochs(n=1), event(kind="step", epoch=0), False),
        (EverySeconds(seconds=600), event(seconds=599.9), False),
        (EverySeconds(seconds=600), event(seconds=600.0), True),
        (OnImprovement(metric="acc", mode="max"), event(metrics={"loss": 1}), False),
        (OnImprovement(metric="acc", mode="max"), event(metrics={"acc": float("nan")}), False),
        (OnThreshold(metric="acc", thresholds=[0.9], mode="max"), event(metrics={"acc": 0.89}), False),
        (OnThreshold(metric="acc", thresholds=[0.9], mode="max"), event(metrics={"acc": 0.9}), True),
        (OnThreshold(metric="loss", thresholds=[0.5]), event(metrics={"loss": 0.4}), True),
        (OnThreshold(metric="loss", thresholds=[0.5]), event(metrics={"loss": 0.6}), False),
    ],
)
def test_trigger_table(trigger, evt, fires) -> None:
    assert trigger.fires(evt) is fires


def test_on_improvement_fires_only_on_a_new_best() -> None:
    trigger = OnImprovement(metric="loss", mode="min")
    fired = [trigger.fires(event(metrics={"loss": v})) for v in [3, 2, 2, 2.5, 1, float("inf")]]
    assert fired == [True, True, False, False, True, False]


def test_each_threshold_fires_once_and_is_remembered_across_a_restart() -> None:
    trigger = OnThreshold(metric="acc", thresholds=[0.5, 0.8, 0.9], mode="max")
    assert [trigger.fires(event(metrics={"acc": v})) for v in [0.6, 0.7, 0.85, 0.6]] == [
        True,
        False,
        True,
        False,
    ]
    restarted = OnThreshold(metric="acc", thresholds=[0.5, 0.8, 0.9], mode="max")
    restarted.load_state_dict(trigger.state_dict())
    assert not restarted.fires(event(metrics={"acc": 0.85}))
    assert restarted.fires(event(metrics={"acc": 0.95}))


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: EverySteps(n=0), r"EverySteps\.n=0 is not allowed; use an integer >= 1"),
        (lambda: EverySteps(n=True), r"EverySteps\.n=True is not allowed; use an integer >= 1"),
        (lambda: EverySteps(n=2.5), r"EverySteps\.n=2\.5 is not allowed; use an integer >= 1"),
        (lambda: EveryEpochs(n="2"), r"EveryEpochs\.n='2' is not allowed"),
        (lambda: EverySeconds(seconds=-1), r"EverySeconds\.seconds=-1 is not allowed; use a number > 0"),
        (lambda: EverySeconds(seconds=float("nan")), r"EverySeconds\.seconds=nan is not allowed"),
        (lambda: OnThreshold(metric="acc", thresholds=[]), r"OnThreshold\.thresholds=\[\] is not allowed"),
        (lambda: OnThreshold(metric="acc", thresholds=["a"]), r"OnThreshold\.thresholds\[0\]='a'"),
        (lambda: OnImprovement(metric=""), r"OnImprovement\.metric='' is not allowed"),
        (lambda: OnImprovement(metric="acc", mode="up"), r"OnImprovement\.mode='up' is not a direction"),
    ],
)
def test_triggers_are_validated_at_construction(build, message) -> None:
    with pytest.raises(ConfigError, match=message):
        build()


def test_every_metric_trigger_defaults_to_min_like_the_rest_of_ladle() -> None:
    assert OnThreshold(metric="loss", thresholds=[1]).mode.value == "min"
    assert OnImprovement(metric="loss").mode.value == "min"


def test_a_trigger_says_why_it_fired() -> None:
    trigger = OnThreshold(metric="acc", thresholds=[0.5, 0.9], mode="max")
    evt = event(metrics={"acc": 0.95})
    assert trigger.fires(evt)
    assert trigger.describe(evt) == "OnThreshold: acc=0.95 reached 0.5, 0.9"
    assert EverySteps(n=5).describe(event(step=10)) == "EverySteps(n=5): step 10"


def test_the_manager_saves_when_any_trigger_fires(tmp_path: Path, model) -> None:
    with ladle.CheckpointManager(
        tmp_path / "run", model=model, every_steps=4, monitor="acc", mode="max", thresholds=[0.5]
    ) as manager:
        for step, acc in enumerate([0.1, 0.2, 0.6, 0.3, 0.4, 0.5, 0.7, 0.2], start=1):
            manager.step(step, metrics={"acc": acc})
        assert [c.step for c in manager.run.checkpoints()] == [3, 4, 8]


def test_without_triggers_every_epoch_end_saves(tmp_path: Path, model) -> None:
    with ladle.CheckpointManager(tmp_path / "run", model=model) as manager:
        for step in range(1, 4):
            assert manager.step(step) is None
        assert manager.epoch_end(0, step=3) is not None
        assert [c.epoch for c in manager.run.checkpoints()] == [0]


def test_wall_time_trigger_saves_after_the_interval(tmp_path: Path, model) -> None:
    clock = [1000.0]
    with ladle.CheckpointManager(
        tmp_path / "run", model=model, every_seconds=600, clock=lambda: clock[0]
    ) as manager:
        clock[0] += 599
        assert manager.step(1) is None
        clock[0] += 2
        assert manager.step(2) is not None
        clock[0] += 300
        assert manager.step(3) is None


def test_improvement_trigger_state_survives_resume(tmp_path: Path, model) -> None:
    kwargs = dict(model=model, monitor="loss", on_improvement=True)
    with ladle.CheckpointManager(tmp_path / "run", **kwargs) as manager:
        manager.step(1, metrics={"loss": 1.0})
        manager.step(2, metrics={"loss": 2.0})
    with ladle.CheckpointManager(tmp_path / "run", **kwargs) as manager:
        manager.resume()
        assert manager.step(3, metrics={"loss": 1.5}) is None
        assert manager.step(4, metrics={"loss": 0.5}) is not None
