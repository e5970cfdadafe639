"""`ladle report`: learning curves from a run's recorded history, checkpoints and soup members marked."""

from __future__ import annotations

import struct
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import ladle
from ladle.averaging.soups import soup
from ladle.cli.main import main
from ladle.errors import ConfigError, MissingDependency
from ladle.store.run import Run
from ladle.tools.report import plot_run
from ladle.tools.report_data import load_history, recipe_members, split_name


def make_run(path: Path, epochs: int = 6, steps_per_epoch: int = 4, seed: int = 0) -> Path:
    """A small run: per-step train_loss, per-epoch train/val metrics, one checkpoint per epoch."""
    torch.manual_seed(seed)
    model = nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    step = 0
    with ladle.CheckpointManager(
        str(path), model=model, optimizer=optimizer, monitor="val_loss", mode="min"
    ) as manager:
        for epoch in range(epochs):
            for _ in range(steps_per_epoch):
                loss = model(torch.randn(8, 3)).pow(2).mean()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                step += 1
                manager.step(step, epoch=epoch, metrics={"train_loss": loss.item()})
            val = 1.0 / (epoch + 1) + (0.3 if epoch == 3 else 0.0)
            manager.epoch_end(epoch, metrics={"val_loss": val, "val_acc": 1 - val / 2, "train_acc": 0.5})
    return path


def png_size(path: Path) -> tuple[int, int]:
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG file"
    return struct.unpack(">II", header[16:24])


@pytest.mark.parametrize(
    ("metric", "panel", "variant"),
    [
        ("val_loss", "loss", "val"),
        ("train_loss", "loss", "train"),
        ("loss", "loss", ""),
        ("val_ema_nll", "nll", "val_ema"),
        ("eval/accuracy", "accuracy", "eval"),
        ("test-f1", "f1", "test"),
        ("val", "val", ""),
        ("lr", "lr", ""),
    ],
)
def test_metrics_that_differ_only_by_split_share_a_panel(metric: str, panel: str, variant: str) -> None:
    assert split_name(metric) == (panel, variant)


def test_the_report_is_a_png_of_the_reported_size_with_one_panel_per_metric(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run")
    out = tmp_path / "report.png"
    result = plot_run(run, out)
    assert out.stat().st_size > 20_000
    assert png_size(out) == (result.width, result.height)
    assert result.width >= 1000 and result.height >= 600
    assert result.panels == ["loss", "acc"]  # the monitored metric's panel first
    assert set(result.series) == {"train_loss", "val_loss", "val_acc", "train_acc"}


def test_the_report_marks_every_saved_checkpoint_and_the_best(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run")
    result = plot_run(run, tmp_path / "report.png")
    assert result.checkpoints == [c.name for c in Run(run).checkpoints()]
    assert result.best == Run(run).best("val_loss", "min").name


def test_history_comes_from_the_newest_checkpoint_and_covers_the_run(tmp_path: Path) -> None:
    history = load_history(Run(make_run(tmp_path / "run", epochs=3, steps_per_epoch=2)))
    assert [r["kind"] for r in history] == ["step", "step", "epoch"] * 3
    assert history[-1]["metrics"]["val_loss"] == pytest.approx(1 / 3)


def test_a_run_without_history_is_drawn_from_its_checkpoints_metrics(tmp_path: Path) -> None:
    run = Run(tmp_path / "run", create=True).acquire()
    for step in (10, 20, 30):
        pending = run.begin(f"step-{step:09d}")
        pending.write("notes.json", lambda path: Path(path).write_text("{}"))
        pending.commit(step=step, metrics={"val_loss": 1.0 / step})
    run.release()
    history = load_history(Run(tmp_path / "run"))
    assert [(r["step"], r["metrics"]["val_loss"]) for r in history] == [(10, 0.1), (20, 0.05), (30, 1 / 30)]
    assert plot_run(tmp_path / "run", tmp_path / "r.png").series == ["val_loss"]


def test_a_recipe_marks_the_checkpoints_it_would_average(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run")
    names = [c.name for c in Run(run).checkpoints()]
    result = plot_run(run, tmp_path / "r.png", recipes=["last:2", "top:2:val_loss:min"])
    assert result.marked["last:2"] == names[-2:]
    assert result.marked["top:2:val_loss:min"] == names[-2:]


def test_a_soup_file_marks_the_members_its_provenance_lists(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run")
    written = soup(run, "top:3:val_acc:max", output=tmp_path / "soup.safetensors")
    marked = recipe_members(Run(run), str(tmp_path / "soup.safetensors"))
    assert [c.name for c in marked.members] == [m.name for m in written.members]
    assert marked.label == "top:3:val_acc:max"


def test_a_soup_file_of_another_run_is_refused(tmp_path: Path) -> None:
    other = make_run(tmp_path / "other", epochs=2)
    soup(other, "last:2", output=tmp_path / "soup.safetensors")
    mine = Run(make_run(tmp_path / "mine", epochs=2, seed=1))  # the same names, other weights
    with pytest.raises(ConfigError, match="are not checkpoints of"):
        recipe_members(mine, str(tmp_path / "soup.safetensors"))


def test_a_greedy_recipe_asks_for_the_soup_file_instead(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run")
    with pytest.raises(ConfigError, match="pass the soup file it wrote"):
        plot_run(run, tmp_path / "r.png", recipes=["greedy:val_acc:max"])


def test_only_the_asked_metrics_are_drawn(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run")
    result = plot_run(run, tmp_path / "r.png", metrics=["loss"])
    assert result.panels == ["loss"]
    assert set(result.series) == {"train_loss", "val_loss"}


def test_an_unknown_metric_is_refused_naming_the_recorded_ones(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run")
    with pytest.raises(ConfigError, match="no recorded metric 'auc'; the run records train_loss"):
        plot_run(run, tmp_path / "r.png", metrics=["auc"])


@pytest.mark.parametrize("x", ["epoch", "time"])
def test_the_x_axis_can_count_epochs_or_wall_time(tmp_path: Path, x: str) -> None:
    run = make_run(tmp_path / "run")
    plot_run(run, tmp_path / "r.png", x=x)
    assert (tmp_path / "r.png").stat().st_size > 10_000


def test_an_svg_report_is_written_when_asked_by_suffix(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run", epochs=2)
    plot_run(run, tmp_path / "r.svg")
    assert (tmp_path / "r.svg").read_text().lstrip().startswith("<?xml")


def test_an_existing_report_is_replaced(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run", epochs=2)
    out = tmp_path / "r.png"
    out.write_text("old")
    plot_run(run, out)
    assert png_size(out)[0] > 0


def test_an_image_format_matplotlib_is_not_asked_for_is_refused(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run", epochs=1)
    with pytest.raises(ConfigError, match=r"write the report as \.png, \.svg or \.pdf"):
        plot_run(run, tmp_path / "r.txt")


def test_a_run_without_metrics_is_refused(tmp_path: Path) -> None:
    with ladle.CheckpointManager(str(tmp_path / "run"), model=nn.Linear(2, 2)) as manager:
        manager.epoch_end(0)
    with pytest.raises(ConfigError, match="no metrics recorded yet"):
        plot_run(tmp_path / "run", tmp_path / "r.png")


def test_without_matplotlib_the_error_names_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = make_run(tmp_path / "run", epochs=1)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(MissingDependency, match=r"pip install 'ladle\[plot\]'"):
        plot_run(run, tmp_path / "r.png")


def test_the_cli_writes_the_report_and_names_the_marked_members(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = make_run(tmp_path / "run")
    out = tmp_path / "report.png"
    assert main(["report", str(run), "-o", str(out), "--recipe", "last:2"]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed
    assert "last:2: 2 members (step-000000020, step-000000024)" in printed
    assert out.stat().st_size > 20_000


def test_the_cli_reports_bad_input_in_one_line_with_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = make_run(tmp_path / "run", epochs=1)
    assert main(["report", str(run), "-o", str(tmp_path / "r.png"), "--x", "wall"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "x='wall' is not known; use one of step, epoch, time" in err


def test_epochs_and_steps_map_onto_each_other_past_both_ends_of_the_run(tmp_path: Path) -> None:
    from ladle.tools.report_data import XAxis

    run = make_run(tmp_path / "run", epochs=3, steps_per_epoch=4)
    axis = XAxis("step", load_history(Run(run)))
    assert [axis.epochs_at(s) for s in (-4, 0, 4, 6, 12, 16)] == [-1.0, 0.0, 1.0, 1.5, 3.0, 4.0]
    for epochs in (-0.5, 0.0, 2.25, 3.0, 5.0):
        assert axis.epochs_at(axis.step_at(epochs)) == pytest.approx(epochs)
