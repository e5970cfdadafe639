"""The daily commands start without importing torch (nor pydantic, which typer would use to
check parameter values), and `ladle --help` imports no command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from ladle import CheckpointManager
from ladle.cli import plain_values
from ladle.cli.app import load_command
from ladle.cli.commands import COMMANDS
from ladle.cli.main import main
from ladle.cli.plain_values import plain_kind, typer_checked

# Runs each command in turn in one interpreter and reports, after each, which heavy
# libraries have been imported so far: one process start for all of them.
PROBE = textwrap.dedent(
    """
    import json, sys
    from ladle.cli.main import main
    from ladle.cli.plain_values import RuntimeParam
    # With a typer the shortcut was not checked against, typer's own (pydantic) checks run.
    heavy = ("torch", "numpy", "safetensors") + (("pydantic",) if RuntimeParam is not None else ())
    report = []
    for argv in json.loads(sys.argv[1]):
        code = main(argv)
        report.append({"argv": argv, "code": code, "loaded": [m for m in heavy if m in sys.modules]})
    sys.stderr.write("PROBE" + json.dumps(report) + "\\n")
    """
)


def _probe(commands: list[list[str]], cwd: Path) -> list[dict]:
    env = {**os.environ, "COLUMNS": "80"}
    done = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps(commands)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    line = next((x for x in done.stderr.splitlines() if x.startswith("PROBE")), None)
    assert line is not None, done.stderr
    return json.loads(line[len("PROBE") :])


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("startup") / "run"
    with CheckpointManager(str(path), model=torch.nn.Linear(3, 2), monitor="loss") as manager:
        for step in (1, 2):
            manager.save(step=step, metrics={"loss": 1.0 / step})
    return path


def test_help_version_ls_and_quick_verify_import_no_torch(run_dir: Path) -> None:
    commands = [
        ["--help"],
        ["--version"],
        ["version"],
        ["version", "--json"],
        ["ls", "--help"],
        ["ls", str(run_dir)],
        ["ls", str(run_dir), "--json"],
        ["verify", "--quick", str(run_dir)],
        ["verify", "--quick", f"{run_dir}/best"],
    ]
    report = _probe(commands, run_dir.parent)
    assert [r["code"] for r in report] == [0] * len(commands)
    assert [(r["argv"], r["loaded"]) for r in report] == [(c, []) for c in commands]


def test_inspect_and_full_verify_of_safetensors_and_ladle_checkpoints_import_no_torch(run_dir: Path) -> None:
    checkpoint = run_dir / "step-000000002"
    commands = [
        ["inspect", str(checkpoint / "model.safetensors")],
        ["inspect", str(checkpoint / "model.safetensors"), "--json"],
        ["inspect", str(run_dir)],
        ["inspect", f"{run_dir}/latest"],
        ["inspect", f"{run_dir}/best"],
        ["inspect", str(checkpoint), "--json"],
        ["verify", str(run_dir)],
        ["verify", f"{run_dir}/latest"],
        ["verify", str(checkpoint)],
    ]
    report = _probe(commands, run_dir.parent)
    assert [r["code"] for r in report] == [0] * len(commands)
    assert [(r["argv"], r["loaded"]) for r in report] == [(c, []) for c in commands]


def test_the_command_listing_matches_each_command(run_dir: Path) -> None:
    for name, (_, summary) in COMMANDS.items():
        command = load_command(name)
        assert command.help.splitlines()[0] == summary, name


@pytest.mark.parametrize(
    ("annotation", "kind"),
    [(str, str), (str | None, str), (bool, bool), (list[str] | None, list), (list[str], list)],
)
def test_strings_flags_and_lists_of_strings_are_plain(annotation: object, kind: type) -> None:
    assert plain_kind(annotation) is kind


@pytest.mark.parametrize("annotation", [int, float | None, list[int], str | int])
def test_values_that_need_converting_are_left_to_typer(annotation: object) -> None:
    assert plain_kind(annotation) is None


def test_a_number_option_is_still_converted_and_checked(
    run_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    step = run_dir / "step-000000001"
    assert main(["diff", str(step), str(step), "--top", "many"]) == 2
    assert "--top" in capsys.readouterr().err
    assert main(["diff", str(step), str(step), "--top", "3", "--json"]) == 0


def test_a_repeated_string_option_arrives_as_a_list() -> None:
    command = load_command("inspect")
    with command.make_context("inspect", ["x.pt", "--strip-prefix", "a.", "--strip-prefix", "b."]) as ctx:
        assert ctx.params["strip_prefix"] == ["a.", "b."] and type(ctx.params["strip_prefix"]) is list
        assert ctx.params["path"] == "x.pt" and ctx.params["key"] is None and ctx.params["trust"] is False


@pytest.mark.parametrize(
    ("version", "checked"),
    [
        ("0.29.2", True),
        ("0.29.0", True),
        ("0.30.0", False),
        ("1.0", False),
        ("", False),
        ("0.29.dev1", True),
        ("dev", False),
    ],
)
def test_the_typer_shortcut_is_installed_only_for_typer_versions_it_was_checked_against(
    version: str, checked: bool
) -> None:
    assert typer_checked(version) is checked


def test_the_installed_typer_is_one_the_shortcut_was_checked_against() -> None:
    import typer

    if not typer_checked(typer.__version__):
        pytest.skip(
            f"typer {typer.__version__} is not in CHECKED_TYPER: ladle's commands start slower (pydantic); "
            "check typer._coercion against cli/plain_values.py and add the version"
        )
    assert plain_values.RuntimeParam is not None
