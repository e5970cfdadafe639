"""Trainer output directories made without ladle (no transformers needed): listing, `ladle avg`,
`ladle.soup` and `ladle soup` on them. Real Trainer runs: tests/test_integration_transformers.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import ladle.integrations.trainer_output as trainer_output
import ladle.store.trainer_dirs as trainer_dirs
from ladle.averaging.member_paths import expand
from ladle.averaging.provenance import read_provenance
from ladle.averaging.selection import select
from ladle.averaging.soups import soup
from ladle.cli.main import main
from ladle.errors import ConfigError, OutputExists
from ladle.store.foreign_runs import TrainerOutput
from ladle.store.run import Run
from ladle.store.trainer_dirs import is_trainer_output, trainer_checkpoints

EVAL_LOSS = {2: 0.9, 4: 0.5, 6: 0.7, 8: 0.6}
MODEL_FILES = {"config.json", "generation_config.json", "tokenizer.json"}


def _weights(step: int) -> dict[str, torch.Tensor]:
    return {"w": torch.tensor([float(step), 1.0]), "n": torch.tensor(step)}


def _trainer_dir(root: Path, *, final_model: bool = True) -> Path:
    """What a plain Trainer (save_steps=2, eval_steps=2, max_steps=8) leaves, weights replaced by
    tiny tensors; with `final_model`, also what `trainer.save_model()` writes into output_dir."""
    history: list[dict[str, float]] = []
    for step, loss in EVAL_LOSS.items():
        history += [
            {"loss": 2.0 / step, "learning_rate": 0.1, "epoch": step / 8, "step": step},
            {"eval_loss": loss, "eval_runtime": 0.1, "epoch": step / 8, "step": step},
        ]
        folder = root / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        save_file(_weights(step), str(folder / "model.safetensors"), metadata={"format": "pt"})
        (folder / "config.json").write_text(json.dumps({"model_type": "toy", "step": step}))
        (folder / "generation_config.json").write_text("{}")
        (folder / "tokenizer.json").write_text("{}")
        for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth", "training_args.bin"):
            (folder / name).write_bytes(b"training state")
        state = {"global_step": step, "epoch": step / 8, "log_history": list(history)}
        (folder / "trainer_state.json").write_text(json.dumps(state))
    if final_model:
        save_file({"w": torch.tensor([100.0, 1.0]), "n": torch.tensor(8)}, str(root / "model.safetensors"))
        (root / "config.json").write_text("{}")
    return root


def _mean(*steps: int) -> torch.Tensor:
    return sum(_weights(s)["w"] for s in steps) / len(steps)  # type: ignore[return-value]


# -- reading ------------------------------------------------------------------------------------------


def test_trainer_checkpoints_have_the_metrics_of_their_step(tmp_path: Path) -> None:
    out = _trainer_dir(tmp_path / "out")
    assert is_trainer_output(out) and not is_trainer_output(out / "checkpoint-2")
    history = trainer_checkpoints(out)
    assert [(c.name, c.step, c.epoch, c.seq) for c in history] == [
        ("checkpoint-2", 2, 0, 1),
        ("checkpoint-4", 4, 0, 2),
        ("checkpoint-6", 6, 0, 3),
        ("checkpoint-8", 8, 0, 4),
    ]
    assert history[1].metrics == {"loss": 0.5, "learning_rate": 0.1, "eval_loss": 0.5}
    assert TrainerOutput(out).checkpoints() == history
    assert TrainerOutput(out).checkpoints(kind="soup") == []


def test_the_integration_keeps_its_names() -> None:
    for name in ("trainer_checkpoints", "metrics_at", "epoch_index", "is_trainer_output", "copy_model_files"):
        assert getattr(trainer_output, name) is getattr(trainer_dirs, name)


@pytest.mark.slow
def test_reading_trainer_dirs_imports_no_training_framework() -> None:
    code = (
        "import sys, ladle.store.trainer_dirs, ladle.integrations.trainer_output; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('transformers', 'lightning')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# -- ladle avg ----------------------------------------------------------------------------------------


def test_expand_gives_the_checkpoint_folders_not_the_final_model(tmp_path: Path) -> None:
    out = _trainer_dir(tmp_path / "out")
    assert expand([out]) == [str(out / f"checkpoint-{s}") for s in (2, 4, 6, 8)]


def test_avg_of_a_trainer_output_directory(tmp_path: Path) -> None:
    out = _trainer_dir(tmp_path / "out")
    target = tmp_path / "avg.safetensors"
    assert main(["avg", str(out), "-o", str(target)]) == 0
    assert torch.equal(load_file(str(target))["w"], _mean(2, 4, 6, 8))
    record = read_provenance(target)
    assert record is not None
    assert [m["step"] for m in record["members"]] == [2, 4, 6, 8]


def test_a_folder_that_is_also_a_ladle_run_expands_to_the_run(tmp_path: Path) -> None:
    out = _trainer_dir(tmp_path / "out")
    run = Run(out, create=True).acquire()  # LadleCallback recording in place
    run.adopt("checkpoint-6", step=6, epoch=0, metrics={"eval_loss": 0.7})
    run.adopt("checkpoint-8", step=8, epoch=0, metrics={"eval_loss": 0.6})
    run.release()
    assert expand([out]) == [str(out / "checkpoint-6"), str(out / "checkpoint-8")]
    assert [m.name for m in soup(out, "uniform").members] == ["checkpoint-6", "checkpoint-8"]


# -- ladle.soup ---------------------------------------------------------------------------------------


def test_soup_into_a_from_pretrained_folder(tmp_path: Path) -> None:
    out = _trainer_dir(tmp_path / "out")
    target = tmp_path / "soup"
    result = soup(out, "top:2:eval_loss:min", output=target)
    assert [m.name for m in result.members] == ["checkpoint-4", "checkpoint-8"]
    assert result.folder == str(target) and result.path == str(target / "model.safetensors")
    assert {p.name for p in target.iterdir()} == {*MODEL_FILES, "model.safetensors", "model.safetensors.json"}
    assert json.loads((target / "config.json").read_text())["step"] == 8  # the newest member's
    soup_state = load_file(str(target / "model.safetensors"))
    assert torch.equal(soup_state["w"], _mean(4, 8)) and soup_state["n"].item() == 8
    record = read_provenance(target / "model.safetensors")
    assert record is not None and record["trainer_output"] == str(out)
    assert [(m["name"], m["step"], m["metrics"]["eval_loss"]) for m in record["members"]] == [
        ("checkpoint-4", 4, 0.5),
        ("checkpoint-8", 8, 0.6),
    ]
    # The Trainer records no checksums: each member is identified by the xxh3-128 of the bytes read.
    assert all(len(m["xxh3_128"]) == 32 and m["sha256"] is None for m in record["members"])
    with pytest.raises(OutputExists, match="already exists"):
        soup(out, "last:2", output=target)
    soup(out, "last:2", output=target, force=True)
    assert torch.equal(load_file(str(target / "model.safetensors"))["w"], _mean(6, 8))


def test_soup_to_a_file_or_in_memory(tmp_path: Path) -> None:
    out = _trainer_dir(tmp_path / "out")
    result = soup(out, "last:3", output=tmp_path / "s.safetensors")
    assert result.folder is None and torch.equal(load_file(str(result.path))["w"], _mean(4, 6, 8))
    in_memory = soup(str(out), "window:step:2-4")
    assert in_memory.state_dict is not None and torch.equal(in_memory.state_dict["w"], _mean(2, 4))


def test_greedy_soup_of_a_trainer_output_directory(tmp_path: Path) -> None:
    out = _trainer_dir(tmp_path / "out")

    def evaluate(state: dict[str, torch.Tensor]) -> float:
        return -abs(float(state["w"][0]) - 5.0)

    result = soup(out, "greedy:score:max", evaluate=evaluate, output=tmp_path / "greedy")
    assert [m.name for m in result.members] == ["checkpoint-4", "checkpoint-6"]
    assert (tmp_path / "greedy" / "config.json").is_file()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"recipe": "top:2", "output": "soup"}, r"top:2 needs a metric.*top:2:METRIC:min\|max"),
        ({"recipe": "last:2", "into_run": True}, r"a Trainer output directory, not a ladle run"),
    ],
)
def test_what_a_trainer_output_directory_cannot_do(tmp_path: Path, kwargs: dict, message: str) -> None:  # type: ignore[type-arg]
    out = _trainer_dir(tmp_path / "out")
    if "output" in kwargs:
        kwargs["output"] = tmp_path / kwargs["output"]
    with pytest.raises(ConfigError, match=message):
        soup(out, **kwargs)
    assert not (tmp_path / "soup").exists()


def test_soup_trainer_output_refuses_greedy_with_the_call_to_make(tmp_path: Path) -> None:
    out = _trainer_dir(tmp_path / "out")
    with pytest.raises(ConfigError, match=r"needs evaluate=; call ladle\.soup\("):
        trainer_output.soup_trainer_output(out, "greedy:eval_loss:min")
    result = trainer_output.soup_trainer_output(out, "top:1:eval_loss:min")
    assert result.folder == str(out / "soup") and [m.name for m in result.members] == ["checkpoint-4"]


# -- ladle soup ---------------------------------------------------------------------------------------


def test_cli_soup_writes_the_folder_beside_the_checkpoints(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = _trainer_dir(tmp_path / "out")
    assert main(["soup", str(out), "--recipe", "top:2:eval_loss:min"]) == 0
    printed = capsys.readouterr().out
    assert "checkpoint-4" in printed and f"soup of 2 checkpoints written to {out / 'soup'}" in printed
    assert torch.equal(load_file(str(out / "soup" / "model.safetensors"))["w"], _mean(4, 8))
    assert {p.name for p in (out / "soup").iterdir()} >= MODEL_FILES
    # the soup folder is not a checkpoint of the directory
    assert [c.name for c in trainer_checkpoints(out)][-1] == "checkpoint-8"


def test_cli_soup_dry_run_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = _trainer_dir(tmp_path / "out")
    assert main(["soup", str(out), "--recipe", "top:2:eval_loss:min", "--dry-run", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert [(m["name"], m["weight"]) for m in record["members"]] == [
        ("checkpoint-4", 0.5),
        ("checkpoint-8", 0.5),
    ]
    assert not (out / "soup").exists()
    target = tmp_path / "s"
    assert main(["soup", str(out), "--recipe", "last:1", "-o", str(target), "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["folder"] == str(target) and record["output"] == str(target / "model.safetensors")


def test_cli_soup_into_run_is_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = _trainer_dir(tmp_path / "out")
    assert main(["soup", str(out), "--recipe", "last:2", "--into-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not a ladle run" in err and "Traceback" not in err


def test_select_reads_no_weights(tmp_path: Path) -> None:
    out = _trainer_dir(tmp_path / "out")
    for folder in out.glob("checkpoint-*"):
        (folder / "model.safetensors").write_bytes(b"not read")
    recipe, chosen = select(out, "top:1:eval_loss:min")
    assert str(recipe) == "top:1:eval_loss:min" and [c.name for c in chosen] == ["checkpoint-4"]
