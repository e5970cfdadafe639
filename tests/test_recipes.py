"""ladle.averaging.recipes and recipe_parsing: parsing recipes and windows, and which checkpoints each chooses."""

from __future__ import annotations

import pytest

from ladle.averaging.recipe_parsing import parse_recipe, parse_window
from ladle.averaging.recipes import (
    Greedy,
    Improved,
    Last,
    Over,
    Recipe,
    Top,
    Uniform,
    Window,
    WindowBy,
)
from ladle.errors import ConfigError
from ladle.metrics import Mode
from ladle.store.checkpoint import CheckpointInfo


def _info(step: int, epoch: int | None = None, **metrics: float) -> CheckpointInfo:
    return CheckpointInfo(
        name=f"s{step}",
        path=f"/run/s{step}",
        step=step,
        epoch=epoch,
        time=0.0,
        metrics=metrics,
        files={},
        seq=step,
    )


HISTORY = [
    _info(1, epoch=1, lrap=0.50, auc=0.70, loss=1.0),
    _info(2, epoch=2, lrap=0.55, auc=0.69, loss=0.8),
    _info(3, epoch=3, lrap=0.53, auc=0.72, loss=0.9),
    _info(4, epoch=4, lrap=0.54, auc=0.71, loss=0.7),
    _info(5, epoch=5, lrap=0.52, auc=0.65, loss=0.95),
    _info(6, epoch=6, lrap=0.57, auc=0.50, loss=0.85),
]


def _names(chosen: list[CheckpointInfo]) -> list[int]:
    return [c.step for c in chosen]


@pytest.mark.parametrize(
    ("recipe", "expected"),
    [
        ("uniform", [1, 2, 3, 4, 5, 6]),
        ("last:2", [5, 6]),
        ("last:99", [1, 2, 3, 4, 5, 6]),
        ("top:2:loss:min", [2, 4]),
        ("top:3:lrap:max", [2, 4, 6]),
        ("last:3@epoch:2-4", [2, 3, 4]),
        ("top:1:auc:max@step:4-", [4]),
        ("window:epoch:3-5", [3, 4, 5]),
        ("uniform@epoch:5", [5]),
        ("improved:lrap,auc:max", [3, 6]),  # the warm-up leaves out the first quarter (2 of 6)
        ("improved:lrap,auc:max:warmup=0", [1, 2, 3, 6]),
        ("improved:lrap,auc:max:over=previous:warmup=0", [1, 2, 3, 4, 6]),
        ("improved:lrap,auc:max@epoch:2-6", [2, 3, 6]),
        ("improved:loss:min,auc:max:warmup=0", [1, 2, 3, 4]),
        ("improved:loss:min:warmup=0", [1, 2, 4]),
        ("greedy:acc:max@epoch:2-3", [2, 3]),
    ],
)
def test_recipes_choose_checkpoints(recipe: str, expected: list[int]) -> None:
    assert _names(parse_recipe(recipe).choose(HISTORY)) == expected


def test_improved_reports_which_metrics_improved() -> None:
    found = Improved(metrics=(("lrap", Mode.MAX), ("auc", Mode.MAX))).improvements(HISTORY)
    assert found == {"s1": ["lrap", "auc"], "s2": ["lrap"], "s3": ["auc"], "s4": [], "s5": [], "s6": ["lrap"]}


def test_missing_or_non_finite_values_never_improve() -> None:
    history = [_info(1, auc=0.5), _info(2), _info(3, auc=float("nan")), _info(4, auc=0.6)]
    assert _names(parse_recipe("improved:auc:max:warmup=0").choose(history)) == [1, 4]
    assert _names(parse_recipe("top:5:auc:max").choose(history)) == [1, 4]


def test_top_ties_go_to_the_earlier_checkpoint() -> None:
    history = [_info(1, loss=0.5), _info(2, loss=0.5), _info(3, loss=0.9)]
    assert _names(parse_recipe("top:1:loss:min").choose(history)) == [1]


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("last:5", Recipe(select=Last(k=5))),
        ("top:3:val_loss:min", Recipe(select=Top(k=3, metric="val_loss", mode=Mode.MIN))),
        ("top:3", Recipe(select=Top(k=3))),
        ("greedy:acc:max", Recipe(select=Greedy(metric="acc", mode=Mode.MAX))),
        ("uniform", Recipe(select=Uniform())),
        (
            "improved:lrap,cmap,f1,auc:max",
            Recipe(select=Improved(metrics=tuple((m, Mode.MAX) for m in ("lrap", "cmap", "f1", "auc"))))),
        (
            "improved:loss:min,auc:max:over=previous",
            Recipe(select=Improved(metrics=(("loss", Mode.MIN), ("auc", Mode.MAX)), over=Over.PREVIOUS)),
        ),
        ("last:5@epoch:13-50", Recipe(select=Last(k=5), window=Window(by=WindowBy.EPOCH, start=13, end=50))),
    ],
)  # fmt: skip
def test_recipe_strings_parse(text: str, parsed: Recipe) -> None:
    assert parse_recipe(text) == parsed


@pytest.mark.parametrize(
    "text",
    [
        "last:5",
        "top:3:val_loss:min",
        "top:3",
        "greedy:acc:max",
        "uniform",
        "improved:loss:min,auc:max",
        "improved:auc:max:over=previous",
        "last:5@epoch:13-50",
        "top:2:acc:max@step:100-",
        "uniform@step:-500",
    ],
)
def test_recipe_strings_round_trip(text: str) -> None:
    assert str(parse_recipe(text)) == text


def test_group_directions_expand_in_canonical_form() -> None:
    assert str(parse_recipe("improved:lrap,cmap:max,loss:min")) == "improved:lrap:max,cmap:max,loss:min"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("last", r"write last:K"),
        ("last:0", r"K=0 must be a whole number of at least 1"),
        ("last:x", r"'x' is not a whole number"),
        ("top:3:loss", r"write top:K:METRIC:min\|max"),
        ("top:3:loss:up", r"'up' is not a direction"),
        ("improved:lrap,auc", r"no direction for lrap, auc; end with :min or :max"),
        ("improved:auc:max:over=worst", r"over='worst' is not known"),
        ("greedy:acc", r"write greedy:METRIC:min\|max"),
        ("best:3", r"recipe 'best:3' not understood; use uniform, last:K"),
        ("last:3@epochs", r"window 'epochs' not understood"),
        ("last:3@epoch:9-2", r"start 9 is after end 2"),
    ],
)
def test_bad_recipes_say_how_to_write_them(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_recipe(text)


@pytest.mark.parametrize(
    ("text", "start", "end"),
    [
        ("epoch:13-50", 13, 50),
        ("epoch:13-", 13, None),
        ("epoch:-50", None, 50),
        ("epoch:7", 7, 7),
        ("epochs=1..3", 1, 3),
    ],
)
def test_windows_parse(text: str, start: int | None, end: int | None) -> None:
    window = parse_window(text)
    assert window is not None
    assert (window.by, window.start, window.end) == (WindowBy.EPOCH, start, end)


def test_epoch_window_on_a_run_without_epochs_is_an_error() -> None:
    with pytest.raises(ConfigError, match="no checkpoint records an epoch; use a step window"):
        parse_recipe("last:2@epoch:1-3").choose([_info(1), _info(2)])


def test_a_second_window_must_agree() -> None:
    with pytest.raises(ConfigError, match="do not give a second one"):
        parse_recipe("last:2@epoch:1-3", window="epoch:2-4")
    assert parse_recipe("last:2", window="step:10-20").window == Window(by=WindowBy.STEP, start=10, end=20)


def test_an_unresolved_top_k_is_a_config_error_not_an_assert() -> None:
    # top:K without a metric means "the run's monitor": choosing before resolving it is a usage error.
    with pytest.raises(ConfigError, match=r"top:2 has no metric: resolve the run's monitor first"):
        parse_recipe("top:2").choose(HISTORY)


def test_a_resolved_top_k_uses_the_monitor() -> None:
    recipe = parse_recipe("top:2")
    assert isinstance(recipe.select, Top)
    resolved = recipe.select.resolved({"metric": "loss", "mode": "min"})
    assert _names(resolved.select(HISTORY, None)) == [2, 4]
