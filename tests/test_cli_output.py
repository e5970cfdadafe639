"""What the CLI prints for people: fits 80 and 120 columns, help without cut text, --version."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ladle import CheckpointManager
from ladle._version import __version__
from ladle.cli.commands import COMMANDS
from ladle.cli.main import main

METRICS = ("val_accuracy", "train_loss", "learning_rate", "f1_macro", "grad_norm")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six checkpoints with a long monitored name and five more metrics: too wide for 80 columns."""
    path = tmp_path_factory.mktemp("out") / "run"
    with CheckpointManager(str(path), model=torch.nn.Linear(3, 2), monitor="val_loss") as manager:
        for step in range(1, 7):
            others = {name: round(0.1 * step + i, 4) for i, name in enumerate(METRICS)}
            manager.save(step=step * 1000, epoch=step, metrics={"val_loss": abs(3.5 - step), **others})
    return path


def ladle(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, columns: int, *args: object
) -> tuple[int, str, str]:
    monkeypatch.setenv("COLUMNS", str(columns))
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def _header(out: str) -> str:
    return next(line for line in out.splitlines() if "name" in line and "step" in line)


def _table_rows(out: str) -> dict[str, str]:
    return {line.split()[1]: line for line in out.splitlines() if "step-0000" in line}


@pytest.mark.parametrize("columns", [80, 120])
def test_ls_fits_the_width_and_always_shows_name_step_monitor_and_marks(
    run_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, columns: int
) -> None:
    code, out, _ = ladle(capsys, monkeypatch, columns, "ls", run_dir)
    assert code == 0
    assert "…" not in out
    assert max(len(line) for line in out.splitlines()) <= columns
    header = next(line for line in out.splitlines() if "name" in line and "step" in line)
    assert "val_loss" in header and "marks" in header
    rows = _table_rows(out)
    assert len(rows) == 6
    assert "best" in rows["step-000003000"] and "0.5" in rows["step-000003000"]
    assert "latest" in rows["step-000006000"]


def test_ls_at_80_columns_names_the_metrics_it_left_out(
    run_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, out, _ = ladle(capsys, monkeypatch, 80, "ls", run_dir)
    note = out.split("┘")[-1]
    assert "not shown" in note and "--metrics" in note
    header = next(line for line in out.splitlines() if "name" in line and "step" in line)
    hidden = [m for m in METRICS if m not in header]
    assert hidden and all(m in note for m in hidden)


def test_ls_at_120_columns_shows_more_metrics_than_at_80(
    run_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, narrow, _ = ladle(capsys, monkeypatch, 80, "ls", run_dir)
    _, wide, _ = ladle(capsys, monkeypatch, 120, "ls", run_dir)
    assert sum(m in _header(wide) for m in METRICS) > sum(m in _header(narrow) for m in METRICS)


def test_ls_metrics_option_picks_the_columns(
    run_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    code, out, _ = ladle(capsys, monkeypatch, 80, "ls", run_dir, "--metrics", "grad_norm")
    header = next(line for line in out.splitlines() if "name" in line and "step" in line)
    assert code == 0 and "grad_norm" in header and "val_loss" in header
    assert not any(m in header for m in METRICS if m != "grad_norm")
    code, out, _ = ladle(capsys, monkeypatch, 80, "ls", run_dir, "--metrics", "none")
    assert code == 0 and not any(m in out for m in METRICS)


def test_ls_metrics_option_refuses_an_unknown_metric(
    run_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    code, out, err = ladle(capsys, monkeypatch, 80, "ls", run_dir, "--metrics", "bleu")
    assert code == 2 and out == "" and err.count("\n") == 1
    assert "--metrics bleu: not recorded" in err and "grad_norm" in err


def test_ls_best_by_a_metric_nobody_recorded_names_the_recorded_ones(
    run_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    code, out, err = ladle(capsys, monkeypatch, 80, "ls", run_dir, "--best-by", "nope")
    assert code == 2 and out == "" and err.count("\n") == 1
    assert "--best-by nope" in err and "val_loss" in err and "f1_macro" in err


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help_at_80_columns_is_readable(
    command: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    code, out, _ = ladle(capsys, monkeypatch, 80, command, "--help")
    assert code == 0
    assert "…" not in out
    assert not any(hint in out for hint in ("<bool>", "<str>", "<int>", "<float>", "<list"))
    assert max(len(line) for line in out.splitlines()) <= 80
    if "Examples:" in out:
        examples = out.split("Examples:")[1].strip("\n").split("\n\n")[0].splitlines()
        assert examples and all(
            line.startswith("    ladle ") or line.startswith("      ") for line in examples
        )


def test_top_level_help_lists_every_command(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    code, out, _ = ladle(capsys, monkeypatch, 80, "--help")
    assert code == 0 and "…" not in out and "..." not in out.split("Commands:")[1]
    assert all(f"  {name} " in out for name in COMMANDS)


def test_version_flag_and_version_json(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    code, out, _ = ladle(capsys, monkeypatch, 80, "--version")
    assert code == 0 and out == f"ladle {__version__}\n"
    code, out, _ = ladle(capsys, monkeypatch, 80, "version", "--json")
    data = json.loads(out)
    # Installed metadata omits the local build label that torch.__version__ carries (+cpu, +cu130).
    assert code == 0 and data["ladle"] == __version__
    assert data["torch"].split("+")[0] == torch.__version__.split("+")[0]


def test_inspect_of_a_training_checkpoint_fits_80_columns(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    with CheckpointManager(
        str(tmp_path / "run"), model=model, optimizer=optimizer, monitor="loss"
    ) as manager:
        manager.save(step=1, metrics={"loss": 1.0})
    code, out, _ = ladle(capsys, monkeypatch, 80, "inspect", tmp_path / "run" / "latest")
    assert code == 0 and "training state" in out and "objects.optimizer" in out
    # The first line is the checkpoint's path, printed whole however long.
    assert "…" not in out and max(len(line) for line in out.splitlines()[1:]) <= 80
