"""SaveRules: one validated description of when to save and what to keep, shared by every front door."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

import ladle
from ladle.errors import ConfigError
from ladle.policies.retention import KeepBest, KeepLast
from ladle.policies.rules import SaveRules, rules_from
from ladle.policies.triggers import EveryEpochs, EverySteps, OnThreshold


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"every_steps": True}, r"every_steps=True is not allowed; use an integer >= 1"),
        ({"every_steps": 2.5}, r"every_steps=2\.5 is not allowed; use an integer >= 1"),
        ({"every_epochs": 0}, r"every_epochs=0 is not allowed"),
        ({"every_seconds": math.nan}, r"every_seconds=nan is not allowed; use a number > 0"),
        ({"monitor": ""}, r"monitor='' is not allowed; use a metric name"),
        ({"mode": "up"}, r"mode='up' is not a direction; use 'min' or 'max'"),
        ({"monitor": "acc", "thresholds": ["a"]}, r"thresholds\[0\]='a' is not allowed; use a number"),
        ({"monitor": "acc", "thresholds": 0.5}, r"thresholds=0\.5 is not allowed; use a non-empty list"),
        ({"thresholds": [0.5]}, r"on_improvement/thresholds need monitor="),
        (
            {"on_improvement": "yes", "monitor": "acc"},
            r"on_improvement='yes' is not allowed; use True or False",
        ),
        ({"triggers": ["every 5"]}, r"triggers='every 5' is not allowed; use ladle trigger objects"),
        ({"keep": True}, r"keep=True is not allowed; use an int n"),
        ({"keep": 0}, r"keep=0 is not allowed; use an integer >= 1"),
        ({"keep": "3"}, r"keep='3' is not allowed"),
        ({"keep": ladle.Keep(best=2)}, r"Keep\(best=\.\.\.\) needs metric="),
    ],
)
def test_bad_rules_are_refused_when_built(kwargs, message) -> None:
    with pytest.raises(ConfigError, match=message):
        SaveRules(**kwargs)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: ladle.Keep(last=2.5), r"Keep\.last=2\.5 is not allowed; use an integer >= 1"),
        (lambda: ladle.Keep(last="3"), r"Keep\.last='3' is not allowed"),
        (lambda: ladle.Keep(last=0), r"Keep\.last=0 is not allowed"),
        (lambda: ladle.Keep(every=True), r"Keep\.every=True is not allowed"),
        (lambda: ladle.Keep(metric="x"), r"Keep\(metric='x', mode=None\) without best= keeps nothing"),
        (lambda: ladle.Keep(), r"Keep\(\) names no policy"),
        (lambda: KeepLast(n=2.5), r"KeepLast\.n=2\.5 is not allowed"),
        (lambda: KeepBest(k=1, metric=""), r"KeepBest\.metric='' is not allowed"),
    ],
)
def test_keep_is_validated_at_construction_not_at_the_first_save(build, message) -> None:
    with pytest.raises(ConfigError, match=message):
        build()


def test_an_int_keep_means_the_newest_n() -> None:
    assert SaveRules(keep=3).policies() == [KeepLast(n=3)]


def test_every_direction_defaults_to_min_and_follows_the_rules_mode() -> None:
    assert SaveRules(monitor="loss", keep=ladle.Keep(best=1)).policies() == [
        KeepBest(k=1, metric="loss", mode="min")
    ]
    assert KeepBest(k=1, metric="loss").mode.value == "min"
    rules = SaveRules(monitor="acc", mode="max", thresholds=[0.9], on_improvement=True)
    assert {t.mode.value for t in rules.build_triggers(default=None)} == {"max"}


def test_rules_build_fresh_triggers_and_fall_back_to_the_default() -> None:
    rules = SaveRules(every_steps=5)
    first, second = rules.build_triggers(default=None), rules.build_triggers(default=None)
    assert first == [EverySteps(n=5)] and first[0] is not second[0]
    assert SaveRules().build_triggers(default=EveryEpochs(n=1)) == [EveryEpochs(n=1)]
    assert isinstance(SaveRules(monitor="x", thresholds=[1]).build_triggers(default=None)[0], OnThreshold)


def test_short_keywords_are_sugar_for_rules() -> None:
    assert rules_from(None, {"every_steps": 5, "keep": 2, "mode": None}, where="X") == SaveRules(
        every_steps=5, keep=2
    )
    rules = SaveRules(every_steps=5)
    assert rules_from(rules, {"monitor": None, "on_improvement": False, "triggers": ()}, where="X") is rules


def test_a_setting_given_both_as_a_keyword_and_in_rules_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"X: keep= is given both as a keyword and in rules=SaveRules"):
        rules_from(SaveRules(every_steps=5), {"keep": 3}, where="X")


def test_the_manager_takes_rules_and_refuses_a_conflict(tmp_path: Path, model) -> None:
    rules = SaveRules(every_steps=2, keep=1)
    with ladle.CheckpointManager(tmp_path / "run", model=model, rules=rules) as manager:
        for step in range(1, 7):
            manager.step(step)
        assert [c.step for c in manager.run.checkpoints()] == [6]
    with pytest.raises(ConfigError, match=r"CheckpointManager: every_steps= is given both"):
        ladle.CheckpointManager(tmp_path / "other", model=model, rules=rules, every_steps=3)
    assert not (tmp_path / "other").exists()


def test_the_manager_accepts_keep_as_an_int(tmp_path: Path, model) -> None:
    with ladle.CheckpointManager(tmp_path / "run", model=model, every_steps=1, keep=2) as manager:
        for step in range(1, 5):
            manager.step(step)
        assert [c.step for c in manager.run.checkpoints()] == [3, 4]


def test_the_lightning_callback_takes_rules_and_refuses_a_conflict(tmp_path: Path) -> None:
    pytest.importorskip("lightning")
    from ladle.integrations.lightning import LadleCheckpoint

    callback = LadleCheckpoint(tmp_path / "run", rules=SaveRules(every_steps=5, keep=3))
    assert callback.rules.policies() == [KeepLast(n=3)]
    with pytest.raises(ConfigError, match=r"LadleCheckpoint: keep= is given both"):
        LadleCheckpoint(tmp_path / "run", rules=SaveRules(every_steps=5), keep=3)


def test_the_transformers_callback_takes_rules_and_refuses_a_conflict(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    from ladle.integrations.transformers import LadleCallback

    callback = LadleCallback(rules=SaveRules(every_steps=5, keep=3))
    assert callback.rules.policies() == [KeepLast(n=3)]
    with pytest.raises(ConfigError, match=r"LadleCallback: every_seconds= is given both"):
        LadleCallback(rules=SaveRules(every_steps=5), every_seconds=60)
