"""`ladle demo`: trains on the bundled digits and compares final models; every number comes from its files."""

from __future__ import annotations

import io
import json
import re
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ladle.cli.main import main
from ladle.demo import Contender, DemoConfig, Scores, load_results, prepare_output, run_demo
from ladle.demo.data import flip_labels, load_splits
from ladle.demo.evaluation import macro_f1, score_files
from ladle.demo.model import build_model
from ladle.demo.table import run_table, summarize
from ladle.errors import ConfigError, OutputExists
from ladle.store.run import Run

EPOCHS = 6  # enough for every recipe to have five checkpoints to choose from


# -- configuration and data ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("epochs", 0, "epochs=0 must be a whole number >= 1"),
        ("seed", -1, "seed=-1 must be a whole number >= 0"),
        ("label_noise", 1.0, "label_noise=1.0 must be a fraction with 0 <= label_noise < 1"),
        ("label_noise", -0.1, "label_noise=-0.1 must be a fraction"),
        ("val_fraction", 0.0, "val_fraction=0.0 must be a fraction with 0 < val_fraction < 0.5"),
        ("lr", 0.0, "lr=0.0 must be a positive number"),
        ("ema_decay", 1.0, r"ema_decay=1.0 must be in \[0, 1\)"),
        ("k", 0, "k=0 must be a whole number >= 1"),
    ],
)
def test_a_bad_setting_is_refused_naming_the_field(field: str, value: Any, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        DemoConfig(**{field: value})


def test_flipped_labels_all_change_class_and_their_count_is_the_rate() -> None:
    labels = np.arange(1000) % 10
    noisy, count = flip_labels(labels, 0.2, np.random.default_rng(0))
    assert count == 200
    assert int((noisy != labels).sum()) == 200
    assert noisy.min() >= 0 and noisy.max() <= 9


def test_the_split_is_seeded_and_only_training_labels_are_noisy() -> None:
    a = load_splits(seed=3, label_noise=0.3)
    b = load_splits(seed=3, label_noise=0.3)
    clean = load_splits(seed=3, label_noise=0.0)
    assert len(a.train) + len(a.val) + len(a.test) == 1797
    assert torch.equal(a.train.x, b.train.x) and torch.equal(a.train.y, b.train.y)
    assert int((a.train.y != clean.train.y).sum()) == a.flipped == round(0.3 * len(a.train))
    assert torch.equal(a.val.y, clean.val.y) and torch.equal(a.test.y, clean.test.y)


def test_another_seed_gives_another_split() -> None:
    assert not torch.equal(
        load_splits(seed=0, label_noise=0).test.x, load_splits(seed=1, label_noise=0).test.x
    )


def test_macro_f1_agrees_with_scikit_learn() -> None:
    from sklearn.metrics import f1_score

    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 10, (300,), generator=generator)
    predicted = torch.where(torch.rand(300, generator=generator) < 0.7, labels, torch.randint(0, 9, (300,)))
    expected = f1_score(labels.numpy(), predicted.numpy(), average="macro", zero_division=0)
    assert macro_f1(predicted, labels) == pytest.approx(expected, abs=1e-12)


def test_an_ensemble_of_one_file_scores_as_the_file(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    torch.manual_seed(0)
    save_file(build_model(16).state_dict(), tmp_path / "m.safetensors")
    split = load_splits(seed=0, label_noise=0).val
    one = score_files([str(tmp_path / "m.safetensors")], split, hidden=16)
    two = score_files([str(tmp_path / "m.safetensors")] * 2, split, hidden=16)
    assert one.correct == two.correct and one.nll == pytest.approx(two.nll, abs=1e-12)


# -- the verdict -------------------------------------------------------------------------------------


def contender(key: str, correct: int) -> Contender:
    scores = Scores(acc=correct / 100, f1=0.5, nll=1.0, correct=correct, n=100)
    return Contender(
        key=key,
        label=key,
        kind="soup",
        recipe=None,
        members=["a"],
        files=["a"],
        forward_passes=1,
        val=scores,
        test=scores,
    )


def test_the_table_says_when_a_recipe_loses_to_the_best_checkpoint() -> None:
    from rich.console import Console

    console = Console(width=120, record=True)
    console.print(run_table([contender("best", 90), contender("worse", 87), contender("better", 92)]))
    text = console.export_text()
    assert re.search(r"worse .* loses \(-3\)", text)
    assert re.search(r"better .* beats \(\+2\)", text)


def test_wins_ties_and_losses_are_counted_per_seed() -> None:
    seeds = [
        [contender("best", 90), contender("soup", 91)],
        [contender("best", 90), contender("soup", 90)],
        [contender("best", 90), contender("soup", 80)],
    ]
    soup = next(s for s in summarize(seeds) if s.key == "soup")
    assert (soup.wins, soup.ties, soup.losses) == (1, 1, 1)


# -- the output folder -------------------------------------------------------------------------------


def test_a_folder_with_files_the_demo_did_not_write_is_refused(tmp_path: Path) -> None:
    (tmp_path / "thesis.tex").write_text("precious")
    with pytest.raises(OutputExists, match="holds files `ladle demo` did not write"):
        prepare_output(str(tmp_path))
    assert (tmp_path / "thesis.tex").read_text() == "precious"


def test_a_previous_demo_is_replaced_and_reported(tmp_path: Path) -> None:
    prepare_output(str(tmp_path))
    (tmp_path / "run").mkdir()
    (tmp_path / "results.json").write_text("{}")
    assert prepare_output(str(tmp_path)) == ["results.json", "run"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".ladle-demo"]


# -- the demo end to end -----------------------------------------------------------------------------


def probabilities(paths: list[Path], x: torch.Tensor, hidden: int) -> torch.Tensor:
    """Mean predicted probabilities of the networks in `paths`, computed here independently of ladle."""
    total = torch.zeros(x.shape[0], 10, dtype=torch.float64)
    for path in paths:
        model = build_model(hidden)
        model.load_state_dict(load_file(path))
        model.eval()
        with torch.no_grad():
            total += torch.softmax(model(x).double(), dim=1)
    return total / len(paths)


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any], str]:
    """One demo run through the CLI: its folder, its results.json and what it printed."""
    out = tmp_path_factory.mktemp("demo") / "out"
    buffer = io.StringIO()
    with redirect_stdout(buffer):  # the CLI's rich console writes to whatever sys.stdout is
        code = main(["demo", "--epochs", str(EPOCHS), "--seed", "7", "--out", str(out)])
    assert code == 0
    return out, load_results(str(out)), buffer.getvalue()


@pytest.mark.slow
def test_every_final_model_rescored_from_its_files_reproduces_the_results(
    demo: tuple[Path, dict[str, Any], str],
) -> None:
    out, results, _ = demo
    config = results["config"]
    splits = load_splits(
        seed=config["seed"],
        label_noise=config["label_noise"],
        val_fraction=config["val_fraction"],
        test_fraction=config["test_fraction"],
    )
    contenders = results["per_seed"][0]["contenders"]
    assert [c["key"] for c in contenders] == [
        "last", "best", "ema", "ema-best", "last-k", "top-k", "improved", "greedy", "ensemble",
    ]  # fmt: skip
    for row in contenders:
        probs = probabilities([out / f for f in row["files"]], splits.test.x, config["hidden"])
        correct = int((probs.argmax(dim=1) == splits.test.y).sum())
        nll = float(-probs.gather(1, splits.test.y[:, None]).log().mean())
        assert correct == row["test"]["correct"], row["key"]
        assert row["test"]["acc"] == correct / len(splits.test)
        assert nll == pytest.approx(row["test"]["nll"], rel=1e-6), row["key"]


@pytest.mark.slow
def test_the_printed_table_shows_the_numbers_of_the_results(demo: tuple[Path, dict[str, Any], str]) -> None:
    _, results, printed = demo
    for row in results["per_seed"][0]["contenders"]:
        line = next(line for line in printed.splitlines() if line.startswith(row["label"] + " "))
        assert f"{100 * row['test']['acc']:.2f}%" in line, line
        assert f"{row['test']['nll']:.4f}" in line, line
        assert f" {len(row['members'])} " in line and f" {row['forward_passes']} " in line, line


@pytest.mark.slow
def test_each_soup_file_is_the_uniform_average_of_the_members_it_names(
    demo: tuple[Path, dict[str, Any], str],
) -> None:
    out, results, _ = demo
    run = Run(out / "run")
    for row in results["per_seed"][0]["contenders"]:
        if row["kind"] != "soup":
            continue
        soup = load_file(out / row["files"][0])
        members = [load_file(run.get(name).file("model.safetensors")) for name in row["members"]]
        for key, tensor in soup.items():
            expected = torch.stack([m[key] for m in members]).mean(dim=0)
            torch.testing.assert_close(tensor, expected, rtol=1e-6, atol=1e-7)
        sidecar = json.loads((out / (row["files"][0] + ".json")).read_text())
        assert [m["name"] for m in sidecar["members"]] == row["members"]


@pytest.mark.slow
def test_the_recipes_choose_what_they_promise(demo: tuple[Path, dict[str, Any], str]) -> None:
    out, results, _ = demo
    rows = {c["key"]: c for c in results["per_seed"][0]["contenders"]}
    checkpoints = Run(out / "run").checkpoints(kind="train")
    names = [c.name for c in checkpoints]
    by_val_nll = sorted(checkpoints, key=lambda c: c.metrics["val_nll"])
    assert rows["last"]["members"] == names[-1:]
    assert rows["best"]["members"] == [by_val_nll[0].name]
    assert rows["ema"]["files"] == [f"run/{names[-1]}/ema.safetensors"]
    ema_best = min(checkpoints, key=lambda c: c.metrics["val_ema_nll"])
    assert rows["ema-best"]["files"] == [f"run/{ema_best.name}/ema.safetensors"]
    assert rows["last-k"]["members"] == names[-5:]
    assert set(rows["top-k"]["members"]) == {c.name for c in by_val_nll[:5]}
    assert rows["ensemble"]["members"] == rows["top-k"]["members"]
    assert rows["ensemble"]["forward_passes"] == 5
    # Greedy never does worse on held-out data than the best single checkpoint it started from.
    best_val_acc = max(c.metrics["val_acc"] for c in checkpoints)
    assert rows["greedy"]["val"]["acc"] >= best_val_acc


@pytest.mark.slow
def test_the_demo_writes_its_report(demo: tuple[Path, dict[str, Any], str]) -> None:
    out, results, printed = demo
    assert results["report"] == "report.png"
    assert (out / "report.png").stat().st_size > 50_000
    assert "wrote " in printed and "report.png" in printed


@pytest.mark.slow
def test_the_same_seed_gives_the_same_numbers(demo: tuple[Path, dict[str, Any], str], tmp_path: Path) -> None:
    _, results, _ = demo
    again = run_demo(DemoConfig(**results["config"]), str(tmp_path / "again"), report=False)
    first = [(c["key"], c["members"], c["test"], c["val"]) for c in results["per_seed"][0]["contenders"]]
    second = [(c.key, c.members, c.test.to_dict(), c.val.to_dict()) for c in again.per_seed[0].contenders]
    assert first == second


@pytest.mark.slow
def test_several_seeds_are_summarized_with_wins_ties_and_losses(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["demo", "--epochs", "3", "--seeds", "2", "--out", str(tmp_path), "--json"])
    assert code == 0
    results = json.loads(capsys.readouterr().out)
    assert results["seeds"] == [0, 1]
    assert [s["folder"] for s in results["per_seed"]] == ["seed-0", "seed-1"]
    assert (tmp_path / "seed-1" / "run" / "ladle.json").is_file()
    for row in results["summary"]:
        assert row["wins"] + row["ties"] + row["losses"] == 2


def test_a_bad_option_exits_2_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--label-noise", "1.5", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "label_noise=1.5" in err
    assert not (tmp_path / "out").exists()


def test_the_demo_leaves_the_callers_torch_settings_and_rng_as_they_were() -> None:
    from ladle.demo.runner import deterministic

    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    threads, strict = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    with deterministic():
        assert torch.get_num_threads() == 1 and torch.are_deterministic_algorithms_enabled()
        torch.rand(100)
    assert torch.get_num_threads() == threads
    assert torch.are_deterministic_algorithms_enabled() == strict
    assert torch.equal(torch.rand(3), expected)


def test_without_matplotlib_the_demo_still_runs_and_says_why_there_is_no_report(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    result = run_demo(DemoConfig(epochs=2), str(tmp_path))
    assert result.report is None
    assert "pip install 'ladle[plot]'" in (result.report_skipped or "")
    assert not (tmp_path / "report.png").exists()
    assert load_results(str(tmp_path))["report"] is None


def test_an_unknown_scenario_is_refused_naming_the_choices() -> None:
    with pytest.raises(ConfigError, match=r"scenario='tiny' is not known; use digits or small-val"):
        DemoConfig(scenario="tiny")


def test_the_small_validation_scenario_recalibrates_its_soups_and_adds_greedy_on_halves(
    tmp_path: Path,
) -> None:
    from ladle import read_provenance

    result = run_demo(DemoConfig(scenario="small-val", epochs=EPOCHS), str(tmp_path / "out"), report=False)
    seed = result.per_seed[0]
    assert seed.data["val"] == 114
    keys = [c.key for c in seed.contenders]
    assert keys[-3:] == ["greedy-nll", "greedy-halves", "ensemble"]
    for contender in seed.contenders:
        if contender.kind != "soup":
            continue
        record = read_provenance(str(tmp_path / "out" / contender.files[0]))
        assert record is not None
        averaged = len(contender.members) > 1
        assert record.get("batchnorm", {}).get("recalibrated", False) is averaged, contender.key
    halves = next(c for c in seed.contenders if c.key == "greedy-halves")
    assert all(step["reason"] for step in halves.details["greedy"])
