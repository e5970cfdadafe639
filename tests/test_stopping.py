"""EarlyStopping: patience, min_delta, warm-up, thresholds, non-finite values, resume."""

from __future__ import annotations

from pathlib import Path

import pytest

import ladle
from ladle.errors import ConfigError


def run_until_stop(es: ladle.EarlyStopping, values: list[float], first_epoch: int = 1) -> int | None:
    for epoch, value in enumerate(values, start=first_epoch):
        if es.update(value, epoch=epoch):
            return epoch
    return None


def classic_losses() -> list[float]:
    """Validation loss improving until epoch 11, then only worse (epochs 1..30)."""
    improving = [1.0 - 0.05 * e for e in range(11)]  # epochs 1..11, best 0.5 at epoch 11
    return improving + [0.6 + 0.01 * e for e in range(19)]


def test_the_classic_example_best_epoch_11_stops_at_the_end_of_epoch_17() -> None:
    es = ladle.EarlyStopping(metric="val_loss", mode="min", patience=5)
    assert run_until_stop(es, classic_losses()) == 17
    assert es.best_epoch == 11 and es.best == pytest.approx(0.5)
    assert es.reason == "val_loss did not improve for 6 evaluations (patience 5); best 0.5 at epoch 11"


def test_max_mode() -> None:
    es = ladle.EarlyStopping(metric="acc", mode="max", patience=1)
    assert run_until_stop(es, [0.5, 0.7, 0.6, 0.65, 0.9]) == 4


def test_absolute_min_delta_ignores_small_improvements() -> None:
    es = ladle.EarlyStopping(metric="loss", patience=1, min_delta=0.1)
    assert run_until_stop(es, [1.0, 0.95, 0.92, 0.5]) == 3


def test_relative_min_delta_scales_with_the_best_value() -> None:
    es = ladle.EarlyStopping(metric="loss", patience=0, min_delta=0.1, delta_mode="rel")
    # 100 -> 89 improves by 11% (> 10%); 89 -> 81 improves by 9% (< 10%): stop.
    assert run_until_stop(es, [100.0, 89.0, 81.0]) == 3


def test_warmup_defers_stopping_until_the_given_epoch() -> None:
    es = ladle.EarlyStopping(metric="loss", patience=1, warmup=6)
    assert run_until_stop(es, [1, 2, 3, 4, 5, 6, 7]) == 6


def test_stopping_threshold_stops_when_good_enough() -> None:
    es = ladle.EarlyStopping(metric="acc", mode="max", patience=100, stopping_threshold=0.95)
    assert run_until_stop(es, [0.5, 0.9, 0.96, 0.97]) == 3
    assert "reached the stopping threshold 0.95" in es.reason


def test_divergence_threshold_stops_when_hopeless() -> None:
    es = ladle.EarlyStopping(metric="loss", patience=100, divergence_threshold=10.0)
    assert run_until_stop(es, [2.0, 5.0, 11.0]) == 3
    assert "worse than the divergence threshold 10" in es.reason


def test_non_finite_values_stop_when_checked() -> None:
    es = ladle.EarlyStopping(metric="loss", patience=100)
    assert run_until_stop(es, [1.0, float("nan")]) == 2
    assert es.reason == "loss is nan at epoch 2"


def test_non_finite_values_count_as_no_improvement_when_not_checked() -> None:
    es = ladle.EarlyStopping(metric="loss", patience=1, check_finite=False)
    assert run_until_stop(es, [1.0, float("nan"), float("inf")]) == 3
    assert es.best == 1.0


def test_options_are_validated() -> None:
    with pytest.raises(ConfigError, match=r"EarlyStopping\.patience=-1 is not allowed; use an integer >= 0"):
        ladle.EarlyStopping(metric="loss", patience=-1)
    with pytest.raises(
        ConfigError, match=r"EarlyStopping\.delta_mode='pct' is not allowed; use one of 'abs'"
    ):
        ladle.EarlyStopping(metric="loss", delta_mode="pct")
    with pytest.raises(ConfigError, match="EarlyStopping.mode='lower'"):
        ladle.EarlyStopping(metric="loss", mode="lower")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"patience": "3"}, r"EarlyStopping\.patience='3' is not allowed; use an integer >= 0"),
        ({"patience": 2.5}, r"EarlyStopping\.patience=2\.5 is not allowed"),
        ({"min_delta": float("nan")}, r"EarlyStopping\.min_delta=nan is not allowed; use a number >= 0"),
        ({"min_delta": True}, r"EarlyStopping\.min_delta=True is not allowed"),
        ({"stopping_threshold": float("inf")}, r"EarlyStopping\.stopping_threshold=inf is not allowed"),
        ({"metric": ""}, r"EarlyStopping\.metric='' is not allowed"),
    ],
)
def test_settings_a_stop_could_depend_on_are_refused_at_construction(kwargs, message) -> None:
    with pytest.raises(ConfigError, match=message):
        ladle.EarlyStopping(**{"metric": "loss", **kwargs})


def test_a_resumed_run_keeps_its_patience(tmp_path: Path, model) -> None:
    losses = classic_losses()
    es = ladle.EarlyStopping(metric="val_loss", patience=5)
    with ladle.CheckpointManager(tmp_path / "run", model=model, early_stopping=es) as manager:
        for epoch in range(1, 15):
            manager.epoch_end(epoch, step=epoch, metrics={"val_loss": losses[epoch - 1]})
    resumed = ladle.EarlyStopping(metric="val_loss", patience=5)
    with ladle.CheckpointManager(tmp_path / "run", model=model, early_stopping=resumed) as manager:
        point = manager.resume()
        assert point.epoch == 15 and resumed.bad_evaluations == 3
        stopped_at = None
        for epoch in range(point.epoch, 31):
            manager.epoch_end(epoch, step=epoch, metrics={"val_loss": losses[epoch - 1]})
            if manager.should_stop:
                stopped_at = epoch
                break
        assert stopped_at == 17
        assert manager.stop_reason.startswith("val_loss did not improve for 6 evaluations")


def test_restore_best_loads_the_best_weights_when_stopping(tmp_path: Path, model) -> None:
    import torch

    es = ladle.EarlyStopping(metric="val_loss", patience=0, restore_best=True)
    with ladle.CheckpointManager(tmp_path / "run", model=model, early_stopping=es) as manager:
        with torch.no_grad():
            model[0].weight.fill_(1.0)
        manager.epoch_end(0, step=1, metrics={"val_loss": 0.1})
        with torch.no_grad():
            model[0].weight.fill_(2.0)
        manager.epoch_end(1, step=2, metrics={"val_loss": 0.9})
        assert manager.should_stop
        assert torch.equal(model[0].weight, torch.ones_like(model[0].weight))
