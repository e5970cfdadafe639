"""`ladle ls | inspect | diff | verify | export` on real runs made by the CheckpointManager."""

from __future__ import annotations

import fractions
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import safetensors.torch
import torch
from torch import nn

from ladle import EMA, CheckpointManager
from ladle.cli.main import main

MODELS = """
import torch
from torch import nn

def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))

class Noisy(nn.Sequential):
    def forward(self, x):
        return super().forward(x) + torch.rand(1)

def noisy():
    return Noisy(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))

def broken():
    raise ValueError("no config")
"""


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))


def _make_run(path: Path) -> Path:
    model = _net()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ema = EMA(model, decay=0.9)
    generator = torch.Generator().manual_seed(0)
    with CheckpointManager(
        str(path), model=model, optimizer=optimizer, ema=ema, monitor="val_loss", mode="min"
    ) as manager:
        for step, (loss, acc) in enumerate([(0.9, 0.5), (0.4, 0.6), (0.6, 0.7)], start=1):
            model(torch.randn(16, 4, generator=generator)).pow(2).mean().backward()
            optimizer.step()
            optimizer.zero_grad()
            ema.update()
            manager.save(step=step * 100, epoch=step, metrics={"val_loss": loss, "acc": acc})
        manager.pin("step-000000100")
    return path


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _make_run(tmp_path_factory.mktemp("cli") / "run")


@pytest.fixture
def fresh_run(tmp_path: Path) -> Path:
    return _make_run(tmp_path / "run")


@pytest.fixture(scope="module")
def models_py(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("code") / "cli_models.py"
    path.write_text(textwrap.dedent(MODELS))
    return path


def ladle(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str, str]:
    """Run the CLI in-process; returns (exit code, stdout, stderr)."""
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


# -- ls --------------------------------------------------------------------------------


def test_ls_shows_each_checkpoint_with_its_marks(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = ladle(capsys, "ls", run_dir)
    assert code == 0
    title = " ".join(out.split("┏")[0].split())  # wrapped between words to the terminal's width
    assert "3 checkpoints" in title and "best = min val_loss" in title
    lines = {line.split()[1]: line for line in out.splitlines() if "step-0000" in line}
    assert "pinned" in lines["step-000000100"] and "ema" in lines["step-000000100"]
    assert "best" in lines["step-000000200"] and "0.4" in lines["step-000000200"]
    assert "latest" in lines["step-000000300"] and "best" not in lines["step-000000300"]


def test_ls_json_for_scripts(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = ladle(capsys, "ls", run_dir, "--json")
    data = json.loads(out)
    assert code == 0 and data["monitor"] == {"metric": "val_loss", "mode": "min"}
    rows = {r["name"]: r for r in data["checkpoints"]}
    assert [r["step"] for r in data["checkpoints"]] == [100, 200, 300]
    assert (
        rows["step-000000200"]["best"]
        and rows["step-000000300"]["latest"]
        and rows["step-000000100"]["pinned"]
    )
    assert rows["step-000000300"]["metrics"] == {"val_loss": 0.6, "acc": 0.7}
    assert rows["step-000000300"]["size"] > 0 and "ema.safetensors" in rows["step-000000300"]["files"]


def test_ls_best_by_another_metric(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = ladle(capsys, "ls", run_dir, "--best-by", "acc", "--mode", "max", "--json")
    rows = {r["name"]: r for r in json.loads(out)["checkpoints"]}
    assert code == 0 and rows["step-000000300"]["best"] and not rows["step-000000200"]["best"]


def test_ls_of_a_run_with_no_checkpoint_yet(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    CheckpointManager(str(tmp_path / "run"), model=_net()).close()
    code, out, _ = ladle(capsys, "ls", tmp_path / "run")
    assert code == 0 and "no checkpoints yet" in out


def test_ls_of_a_folder_that_is_no_run_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "cat.jpg").write_bytes(b"\xff\xd8")
    code, out, err = ladle(capsys, "ls", tmp_path / "photos")
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "photos: not a ladle run" in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["ls", "{tmp}/nowhere"], "nowhere: no such run directory"),
        (["ls", "{run}/step-000000100"], "is one checkpoint, not a run"),
        (["ls", "{run}", "--mode", "max"], "--mode needs --best-by METRIC"),
        (["ls", "{run}", "--best-by", "acc", "--mode", "up"], "--mode='up' is not a direction"),
    ],
)
def test_ls_bad_input_exits_2_with_one_line(
    args: list[str], message: str, run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = ladle(capsys, *[a.format(tmp=tmp_path, run=run_dir) for a in args])
    assert code == 2 and out == ""
    assert message in err and err.startswith("ladle: error: ") and err.count("\n") == 1
    assert "Traceback" not in err


# -- inspect ---------------------------------------------------------------------------


def test_inspect_a_checkpoint_shows_tensors_and_training_state(
    run_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = ladle(capsys, "inspect", run_dir / "step-000000200")
    assert code == 0
    assert "ladle checkpoint (weights: model)" in out
    assert "step 200, epoch 2" in out and "val_loss=0.4" in out and "pinned" not in out
    assert "objects.optimizer" in out and "Adam-style" in out and "ema.safetensors" in out
    assert "1.running_mean" in out and "[2, 8]" in out


def test_inspect_json_of_the_ema_weights(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = ladle(capsys, "inspect", run_dir / "step-000000300", "--ema", "--json")
    data = json.loads(out)
    assert code == 0 and data["weights"] == "ema" and data["format"] == "ladle"
    assert {t["name"] for t in data["tensors"]} == set(_net().state_dict())
    assert data["numel"] == sum(t.numel() for t in _net().state_dict().values())
    kinds = {s["name"]: s["kind"] for s in data["training_state"]}
    assert kinds["objects.optimizer"] == "optimizer" and kinds["objects.ema"] == "ema"


def test_inspect_filter_narrows_the_tensor_list(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = ladle(capsys, "inspect", run_dir, "--filter", "3.*", "--json")
    assert code == 0 and {t["name"] for t in json.loads(out)["tensors"]} == {"3.weight", "3.bias"}


def test_inspect_a_pickle_that_needs_trust_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "train.ckpt"
    torch.save({"state_dict": _net().state_dict(), "hparams": fractions.Fraction(1, 10)}, path)
    code, out, _ = ladle(capsys, "inspect", path)
    assert code == 0
    assert "needs --trust to list its tensors" in out and "fractions.Fraction" in out
    assert "state_dict" in out and "weights" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["inspect", "{tmp}/missing.pt"], "missing.pt: no such file or directory"),
        (
            ["inspect", "{run}/step-000000100", "--ema", "--key", "model"],
            "--ema and --key model ask for different weights",
        ),
        (["inspect", "{run}/step-000000100", "--key", "teacher"], "no weights 'teacher'"),
        (["inspect", "{run}/step-000000100", "--filter", "nothing*"], "no tensor name matches --filter"),
    ],
)
def test_inspect_bad_input_exits_2(
    args: list[str], message: str, run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = ladle(capsys, *[a.format(tmp=tmp_path, run=run_dir) for a in args])
    assert code == 2 and message in err and "Traceback" not in err


# -- diff ------------------------------------------------------------------------------


def test_diff_of_identical_checkpoints_exits_0(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = run_dir / "step-000000200"
    code, out, _ = ladle(capsys, "diff", ckpt, ckpt)
    assert code == 0 and "identical: 9 tensors, bitwise equal" in out


def test_diff_of_different_checkpoints_exits_1_with_a_summary(
    run_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = ladle(capsys, "diff", run_dir / "step-000000100", run_dir / "step-000000300")
    assert code == 1
    assert "changed tensors" in out and "0.weight" in out
    assert out.strip().splitlines()[-1].startswith("different: 9 of 9 shared tensors changed")


def test_diff_json_compares_raw_and_ema(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = run_dir / "step-000000300"
    code, out, _ = ladle(capsys, "diff", ckpt, ckpt, "--key-b", "ema", "--json")
    data = json.loads(out)
    assert code == 1 and data["same"] is False and data["only_a"] == [] and data["only_b"] == []
    relatives = [c["relative"] for c in data["value_changes"]]
    assert relatives == sorted(relatives, reverse=True)


def test_diff_lists_keys_only_on_one_side(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    safetensors.torch.save_file({"a": torch.ones(2), "b": torch.ones(2)}, str(tmp_path / "x.safetensors"))
    safetensors.torch.save_file({"a": torch.ones(2), "c": torch.ones(3)}, str(tmp_path / "y.safetensors"))
    code, out, _ = ladle(capsys, "diff", tmp_path / "x.safetensors", tmp_path / "y.safetensors")
    assert code == 1 and "only in A (1): b" in out and "only in B (1): c" in out


def test_diff_and_inspect_take_best_latest_and_step_references(
    run_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = ladle(capsys, "diff", run_dir / "best", run_dir / "200", "--json")
    data = json.loads(out)
    assert code == 0 and data["a"] == data["b"] == str(run_dir / "step-000000200")
    code, out, _ = ladle(capsys, "inspect", run_dir / "latest", "--json")
    assert code == 0 and json.loads(out)["checkpoint"]["name"] == "step-000000300"
    code, _, err = ladle(capsys, "inspect", run_dir / "999")
    assert code == 2 and "no checkpoint 999; available: step-000000100" in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["diff", "{run}/step-000000100", "{tmp}/nope.safetensors"], "nope.safetensors: no such file"),
        (["diff", "{run}/step-000000100", "{run}/step-000000200", "--atol", "-1"], "--atol -1.0 is negative"),
    ],
)
def test_diff_bad_input_exits_2(
    args: list[str], message: str, run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = ladle(capsys, *[a.format(tmp=tmp_path, run=run_dir) for a in args])
    assert code == 2 and message in err


# -- verify ----------------------------------------------------------------------------


def test_verify_a_healthy_run_exits_0(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = ladle(capsys, "verify", run_dir)
    assert code == 0 and "all 3 checkpoints verified" in out
    assert out.count("ok  step-") == 3


def test_verify_names_the_bad_file_and_exits_1(fresh_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = fresh_run / "step-000000200" / "state.pt"
    bad.write_bytes(bad.read_bytes()[:-10])
    code, out, _ = ladle(capsys, "verify", fresh_run)
    assert code == 1
    assert "BAD step-000000200" in out and f"{bad}: size" in out
    assert "1 of 3 checkpoints failed verification" in out


def test_verify_json_and_quick_mode(fresh_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (fresh_run / "step-000000100" / "model.safetensors").unlink()
    code, out, _ = ladle(capsys, "verify", fresh_run / "step-000000100", "--quick", "--json")
    data = json.loads(out)
    assert code == 1 and data["ok"] is False and data["bad"] == 1
    assert data["checkpoints"][0]["problems"][0].endswith("model.safetensors: missing (meta.json lists it)")


def test_verify_a_missing_path_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = ladle(capsys, "verify", tmp_path / "gone")
    assert code == 2 and "no such run or checkpoint" in err


# -- export ----------------------------------------------------------------------------


def test_export_weights_prints_the_size_before_and_after(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_file = tmp_path / "model.safetensors"
    code, out, _ = ladle(
        capsys, "export", run_dir / "step-000000300", "-o", out_file, "--ema", "--dtype", "bf16"
    )
    assert code == 0
    assert f"wrote {out_file} (safetensors, ema weights, bf16)" in out
    assert "checkpoint ->" in out
    assert safetensors.torch.load_file(str(out_file))["0.weight"].dtype == torch.bfloat16


def test_export_torchscript_json_reports_the_difference(
    run_dir: Path, models_py: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = ladle(
        capsys,
        "export",
        run_dir / "step-000000300",
        "-o",
        tmp_path / "m.pt",
        "--to",
        "torchscript",
        "--model",
        f"{models_py}:net",
        "--input-shape",
        "3,4",
        "--json",
    )
    data = json.loads(out)
    assert code == 0 and data["target"] == "torchscript" and data["max_abs_diff"] <= 1e-6
    assert data["bytes_before"] > data["bytes_after"] > 0


def test_export_onnx_is_chosen_by_the_output_name(
    run_dir: Path, models_py: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in ("onnx", "onnxscript", "onnxruntime"):
        pytest.importorskip(name)
    code, out, _ = ladle(
        capsys,
        "export",
        run_dir / "step-000000300",
        "-o",
        tmp_path / "m.onnx",
        "--model",
        f"{models_py}:net",
        "--input-shape",
        "3,4",
    )
    assert code == 0 and "(onnx, model weights)" in out and "max |diff|" in out


def test_export_that_disagrees_exits_1(
    run_dir: Path, models_py: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = ladle(
        capsys,
        "export",
        run_dir / "step-000000300",
        "-o",
        tmp_path / "m.pt",
        "--to",
        "torchscript",
        "--model",
        f"{models_py}:noisy",
        "--input-shape",
        "3,4",
    )
    assert code == 1 and "disagrees with eager PyTorch" in err and not (tmp_path / "m.pt").exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            ["--to", "torchscript", "--model", "{models}:broken", "--input-shape", "3,4"],
            "the factory raised ValueError: no config",
        ),
        (["--to", "torchscript", "--model", "{models}:net"], "needs an example input shape"),
        (["--to", "onnx", "--input-shape", "3,4"], "needs the model's code"),
        (["--input-dtype", "int64"], "--input-dtype needs --input-shape"),
        (
            [
                "--to",
                "torchscript",
                "--model",
                "{models}:net",
                "--input-shape",
                "3,4",
                "--input-shape",
                "2,4",
                "--input-dtype",
                "float32",
                "--input-dtype",
                "int64",
                "--input-dtype",
                "int64",
            ],
            "3 --input-dtype for 2 --input-shape",
        ),
    ],
)
def test_export_bad_input_exits_2(
    extra: list[str],
    message: str,
    run_dir: Path,
    models_py: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    args = ["export", str(run_dir / "step-000000300"), "-o", str(tmp_path / "m.pt")]
    code, _, err = ladle(capsys, *args, *[a.format(models=models_py) for a in extra])
    assert code == 2 and message in err and "Traceback" not in err


# -- help and a real process -----------------------------------------------------------


@pytest.mark.parametrize("command", ["ls", "inspect", "diff", "verify", "export"])
def test_every_command_has_help_with_an_example(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = ladle(capsys, command, "--help")
    assert code == 0 and f"ladle {command}" in out and "Example" in out and "--json" in out


def test_the_installed_console_script_runs(run_dir: Path, tmp_path: Path) -> None:
    script = shutil.which("ladle", path=str(Path(sys.executable).parent))
    assert script is not None
    done = subprocess.run([script, "ls", str(run_dir), "--json"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert [c["step"] for c in json.loads(done.stdout)["checkpoints"]] == [100, 200, 300]
    missing = subprocess.run(
        [script, "verify", str(tmp_path / "gone")], capture_output=True, text=True, timeout=120
    )
    assert missing.returncode == 2 and missing.stderr.startswith("ladle: error: ")


def test_python_dash_m_ladle_is_the_same_command(run_dir: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "ladle", "ls", str(run_dir), "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert [c["step"] for c in json.loads(done.stdout)["checkpoints"]] == [100, 200, 300]
