"""Bad input and a failing machine end in one line on stderr, the documented exit status, no leftovers."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import safetensors.torch
import torch

from ladle import CheckpointManager
from ladle.cli.main import main


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three checkpoints of a 200x200 layer (160 KiB each), all with different weights."""
    path = tmp_path_factory.mktemp("errors") / "run"
    model = torch.nn.Linear(200, 200)
    with CheckpointManager(str(path), model=model, monitor="loss") as manager:
        for step in (1, 2, 3):
            with torch.no_grad():
                model.weight.add_(1.0)
            manager.save(step=step, metrics={"loss": 1.0 / step})
    return path


@pytest.fixture
def full_disk(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB file system: too small for one averaged checkpoint (needs root to mount)."""
    mount_point = tmp_path / "full"
    mount_point.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount_point)],
        capture_output=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({done.stderr.decode().strip()})")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], check=True)


def ladle(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def _one_error_line(err: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("ladle: error: "), err
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize("command", ["avg", "soup"])
def test_a_full_disk_is_one_line_exit_1_and_leaves_nothing(
    command: str, run_dir: Path, full_disk: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = [run_dir] if command == "avg" else [run_dir, "--recipe", "last:2"]
    code, _, err = ladle(capsys, command, *args, "-o", full_disk / "soup.safetensors")
    assert code == 1
    assert "No space left on device" in _one_error_line(err)
    assert sorted(os.listdir(full_disk)) == []


def test_an_output_that_cannot_be_written_is_one_line_exit_1(
    run_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if not os.path.isdir("/sys/kernel"):
        pytest.skip("needs Linux sysfs (never writable for new files)")
    code, _, err = ladle(capsys, "avg", run_dir, "-o", "/sys/x.safetensors")
    assert code == 1
    line = _one_error_line(err)
    assert "/sys/" in line and "Permission denied" in line


def test_a_url_whose_file_system_is_not_installed_is_one_line_exit_1(
    capsys: pytest.CaptureFixture[str],
) -> None:
    if importlib.util.find_spec("gcsfs") is not None:
        pytest.skip("gcsfs is installed")
    code, out, err = ladle(capsys, "ls", "gcs://bucket/run")
    assert code == 1 and out == ""
    assert "gcsfs" in _one_error_line(err)


def test_avg_refuses_an_output_name_of_another_format(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = ladle(capsys, "avg", run_dir, "-o", tmp_path / "model.onnx")
    assert code == 2
    line = _one_error_line(err)
    assert "model.onnx" in line and "ladle export" in line
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (
            ["-o", "{tmp}/s.safetensors", "--name", "mine"],
            "--name names the checkpoint that --into-run commits",
        ),
        (["-o", "{tmp}/s.safetensors", "--dry-run"], "--dry-run writes nothing, so -o would be ignored"),
        (["--into-run", "--dry-run"], "--dry-run writes nothing, so --into-run would be ignored"),
    ],
)
def test_soup_refuses_flags_that_contradict_each_other(
    flags: list[str], message: str, run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = sorted(os.listdir(run_dir))
    args = [f.format(tmp=tmp_path) for f in flags]
    code, out, err = ladle(capsys, "soup", run_dir, "--recipe", "last:2", *args)
    assert code == 2 and out == ""
    assert message in _one_error_line(err)
    assert sorted(os.listdir(run_dir)) == before and list(tmp_path.iterdir()) == []


def test_diff_reports_nan_on_one_side(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    clean = torch.ones(4)
    broken = clean.clone()
    broken[1] = float("nan")
    safetensors.torch.save_file({"w": clean}, tmp_path / "a.safetensors")
    safetensors.torch.save_file({"w": broken}, tmp_path / "b.safetensors")
    code, out, _ = ladle(capsys, "diff", tmp_path / "a.safetensors", tmp_path / "b.safetensors", "--json")
    assert code == 1
    change = json.loads(out)["value_changes"][0]
    assert change["name"] == "w" and change["max_abs"] == "nan"
