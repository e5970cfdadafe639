"""One reference grammar (`RUN/best`, `RUN@latest`, `RUN/<step>`, `RUN@<name>`) everywhere."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ladle import CheckpointManager, Run
from ladle.cli.main import main
from ladle.errors import CheckpointNotFound
from ladle.store.refs import find_checkpoint, parse_selector, resolve_checkpoint, split_reference


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("runs/exp1/best", ("runs/exp1", "best")),
        ("runs/exp1/latest/", ("runs/exp1", "latest")),
        ("runs/exp1/1200", ("runs/exp1", 1200)),
        ("runs/exp1@best", ("runs/exp1", "best")),
        ("runs/exp1@1200", ("runs/exp1", 1200)),
        ("runs/exp1/@latest", ("runs/exp1", "latest")),
        ("runs/exp1@step-000001200", ("runs/exp1", "step-000001200")),
        ("s3://bucket/runs/exp1@best", ("s3://bucket/runs/exp1", "best")),
        ("s3://bucket/runs/exp1/latest", ("s3://bucket/runs/exp1", "latest")),
        ("/home/me@host/runs/exp1/best", ("/home/me@host/runs/exp1", "best")),
        ("runs/exp1/step-000001200", None),
        ("model.safetensors", None),
        ("best", None),
    ],
)
def test_references_are_split_by_form(text: str, expected: tuple[str, str | int] | None) -> None:
    assert split_reference(text) == expected


def test_selectors_are_roles_steps_or_names() -> None:
    assert [parse_selector(s) for s in ("best", "latest", "1200", 7, "soup-a")] == [
        "best",
        "latest",
        1200,
        7,
        "soup-a",
    ]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("refs") / "run"
    model = torch.nn.Linear(2, 2)
    with CheckpointManager(str(path), model=model, monitor="loss") as manager:
        for step, loss in ((100, 0.5), (200, 0.1), (300, 0.3)):
            with torch.no_grad():
                model.weight.fill_(step)
            manager.save(step=step, metrics={"loss": loss})
    return path


@pytest.mark.parametrize(
    ("ref", "name"),
    [
        ("{run}/best", "step-000000200"),
        ("{run}@best", "step-000000200"),
        ("{run}/latest", "step-000000300"),
        ("{run}@latest", "step-000000300"),
        ("{run}/100", "step-000000100"),
        ("{run}@100", "step-000000100"),
        ("{run}@step-000000100", "step-000000100"),
        ("{run}/step-000000100", "step-000000100"),
    ],
)
def test_every_form_names_the_same_checkpoint_for_every_reader(
    ref: str, name: str, run_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = ref.format(run=run_dir)
    expected = str(run_dir / name)
    assert resolve_checkpoint(text) == expected
    found = find_checkpoint(text)
    assert found is not None and found.name == name
    assert main(["verify", "--quick", "--json", text]) == 0
    assert [c["name"] for c in json.loads(capsys.readouterr().out)["checkpoints"]] == [name]
    assert main(["inspect", "--json", text]) == 0
    assert json.loads(capsys.readouterr().out)["checkpoint"]["name"] == name
    assert main(["diff", text, expected]) == 0
    capsys.readouterr()


def test_avg_takes_references_of_both_forms(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "two.safetensors"
    assert main(["avg", f"{run_dir}/best", f"{run_dir}@100", "-o", str(out), "--json"]) == 0
    members = [m["path"] for m in json.loads(capsys.readouterr().out)["members"]]
    assert members == [str(run_dir / "step-000000200"), str(run_dir / "step-000000100")]


def test_run_get_and_resume_read_the_same_grammar(run_dir: Path, tmp_path: Path) -> None:
    run = Run(str(run_dir))
    assert run.get("200").name == run.get(200).name == run.get("best").name == "step-000000200"
    model = torch.nn.Linear(2, 2)
    with CheckpointManager(str(tmp_path / "other"), model=model) as manager:
        point = manager.resume(f"{run_dir}@100")
    assert point is not None and float(model.weight.detach()[0, 0]) == 100.0
    with CheckpointManager(str(tmp_path / "third"), model=model) as manager:
        manager.resume(f"{run_dir}/best")
    assert float(model.weight.detach()[0, 0]) == 200.0


def test_an_unknown_selector_lists_what_exists(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(CheckpointNotFound, match="step-000000300"):
        find_checkpoint(f"{run_dir}@999")
    assert main(["inspect", f"{run_dir}/999"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no checkpoint 999" in err
