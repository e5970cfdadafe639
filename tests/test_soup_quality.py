"""bench/soup_quality.py: the soup-quality experiment runs, and its tables count what they claim."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench" / "soup_quality.py"


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("soup_quality", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["soup_quality"] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


def test_a_quick_run_reports_every_recipe_against_the_best_checkpoint(
    bench: ModuleType, tmp_path: Path
) -> None:
    printed: list[str] = []
    out = tmp_path / "results.json"
    argv = ["--quick", "--seeds", "1", "--epochs", "3", "--tasks", "cancer", "--json", str(out)]
    report = bench.main(argv, write=printed.append)
    rows = {row["key"]: row for row in report["tasks"]["cancer"]["rows"]}
    assert list(rows) == [c.key for c in bench.CONTENDERS]
    for key, row in rows.items():
        if key != bench.REFERENCE:
            assert row["wins"] + row["ties"] + row["losses"] == row["made"] <= 1
    reference = rows[bench.REFERENCE]
    assert reference["wins"] == reference["losses"] == 0  # the reference ties itself
    assert json.loads(out.read_text(encoding="utf-8")) == report
    table = printed[0]
    assert table.startswith("**cancer**")
    assert "| best checkpoint | 1 |" in table and "reference" in table


def test_the_splits_are_seeded_and_only_training_labels_are_noisy(bench: ModuleType) -> None:
    task = bench.TASKS["synthetic-small"]
    a, b = bench.load_task(task, 3), bench.load_task(task, 3)
    assert (a.y_train == b.y_train).all() and (a.x_val == b.x_val).all()
    assert len(a.y_val) == 150
    clean = bench.load_task(bench.Task(name="synthetic", description="", noise=0.0), 3)
    flipped = float((clean.y_train != a.y_train).double().mean())
    assert flipped == pytest.approx(0.25, abs=0.01)
    assert (clean.y_test == a.y_test).all()
