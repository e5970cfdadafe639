"""Metric values: one encoder, so every file ladle writes is valid JSON and non-finite values never win."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import ladle
from ladle.errors import ConfigError
from ladle.metrics import encode_metrics, is_better, is_finite_number, json_value, metric_value


@pytest.mark.parametrize(
    ("value", "encoded"),
    [
        (0.25, 0.25),
        (3, 3),
        (math.nan, "nan"),
        (math.inf, "inf"),
        (-math.inf, "-inf"),
        (torch.tensor(0.5), 0.5),
        (torch.tensor([float("nan")]), "nan"),
        (np.float32(-np.inf), "-inf"),
        (np.int64(7), 7),
        ("nan", "nan"),
        (True, None),
        ("0.5", None),
        (object(), None),
        (torch.ones(3), None),
        ([1, 2], None),
    ],
)
def test_metric_values_encode_as_json_numbers_or_non_finite_strings(value, encoded) -> None:
    assert metric_value(value) == encoded


def test_encoded_non_finite_values_read_back_as_non_finite_and_never_win() -> None:
    for text in ("nan", "inf", "-inf"):
        assert not is_finite_number(text)
        assert not is_better(text, 1.0, "min")


def test_a_value_that_is_not_a_number_is_a_config_error_naming_where_and_the_key() -> None:
    with pytest.raises(
        ConfigError, match=r"step\(metrics\)\['acc'\]=<object object .*> is not allowed; use a number"
    ):
        encode_metrics({"acc": object()}, where="step(metrics)")
    with pytest.raises(ConfigError, match=r"save\(metrics\)=\[1, 2\] is not allowed; use a mapping"):
        encode_metrics([1, 2], where="save(metrics)")
    assert encode_metrics({"acc": object(), "loss": 1.5}, lenient=True) == {"loss": 1.5}


def test_json_value_makes_any_metadata_strict_json() -> None:
    value = json_value({"a": (1, math.nan), "b": {"c": math.inf}, "d": object})
    assert json.loads(json.dumps(value, allow_nan=False)) == {
        "a": [1, "nan"],
        "b": {"c": "inf"},
        "d": str(object),
    }


def test_history_and_meta_json_hold_no_bare_nan(tmp_path: Path, model) -> None:
    with ladle.CheckpointManager(tmp_path / "run", model=model, every_steps=1) as manager:
        manager.step(1, metrics={"loss": math.nan, "grad": torch.tensor(math.inf)})
        manager.epoch_end(0, step=1, metrics={"val": -math.inf})
    strict = {"parse_constant": lambda name: pytest.fail(f"bare {name} in a file ladle wrote")}
    lines = (tmp_path / "run" / "history.jsonl").read_text().splitlines()
    entries = [json.loads(line, **strict) for line in lines]
    assert [e["metrics"] for e in entries if e.get("kind") != "resume"] == [
        {"loss": "nan", "grad": "inf"},
        {"val": "-inf"},
    ]
    (checkpoint,) = [p for p in (tmp_path / "run").iterdir() if p.name.startswith("step-")]
    meta = json.loads((checkpoint / "meta.json").read_text(), **strict)
    assert meta["metrics"] == {"loss": "nan", "grad": "inf", "val": "-inf"}
    json.loads((tmp_path / "run" / "ladle.json").read_text(), **strict)


def test_a_bad_metric_fails_at_the_call_before_anything_is_written(tmp_path: Path, model) -> None:
    with ladle.CheckpointManager(tmp_path / "run", model=model, every_steps=1) as manager:
        with pytest.raises(ConfigError, match=r"step\(metrics\)\['acc'\]"):
            manager.step(1, metrics={"acc": object()})
        with pytest.raises(ConfigError, match=r"save\(metrics\)=\[1, 2\] is not allowed"):
            manager.save(metrics=[1, 2])  # type: ignore[arg-type]
        assert manager.run.checkpoints() == [] and manager.history == []
