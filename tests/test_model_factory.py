"""ladle.tools.model_factory: the one loader of the user's code named on the command line."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from ladle.cli.main import main
from ladle.errors import ModelFactoryError
from ladle.store.run import Run
from ladle.tools.model_factory import build_model, factory_for, resolve_callable

CODE = """
import torch
from torch import nn

import helper_of_ladle_test  # a sibling module: needs the folder on sys.path while importing


def build():
    return nn.Linear(2, 1)


def evaluate(state):
    return {"score": float(state["weight"].sum())}
"""


@pytest.fixture
def user_code(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "proj"
    folder.mkdir()
    (folder / "ladle_test_models.py").write_text(CODE)
    (folder / "helper_of_ladle_test.py").write_text("VALUE = 1\n")
    monkeypatch.chdir(folder)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(folder))])
    for name in ("ladle_test_models", "helper_of_ladle_test"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    return folder


def test_a_module_in_the_working_directory_is_imported_and_the_directory_not_left_on_the_path(
    user_code: Path,
) -> None:
    before = list(sys.path)
    evaluate = resolve_callable("ladle_test_models:evaluate", flag="--eval")
    assert evaluate({"weight": torch.ones(2)}) == {"score": 2.0}
    assert sys.path == before


def test_a_file_spec_is_imported_the_same_way(user_code: Path) -> None:
    before = list(sys.path)
    model = build_model(str(user_code / "ladle_test_models.py") + ":build")
    assert isinstance(model, nn.Linear)
    assert sys.path == before


def test_a_factory_is_resolved_at_once_and_builds_on_each_call(user_code: Path) -> None:
    with pytest.raises(ModelFactoryError, match=r"--model 'ladle_test_models:nothing': .* has no attribute"):
        factory_for("ladle_test_models:nothing")
    factory = factory_for("ladle_test_models:build")
    assert factory() is not factory()


def test_errors_name_the_flag_that_gave_the_spec() -> None:
    with pytest.raises(ModelFactoryError, match=r"^--eval 'nocolon': expected MODULE:FUNCTION"):
        resolve_callable("nocolon", flag="--eval")
    with pytest.raises(ModelFactoryError, match=r"^--model 'nocolon': expected MODULE:FACTORY"):
        resolve_callable("nocolon", flag="--model")


def _one_checkpoint_run(path: Path) -> Path:
    run = Run(path, create=True).acquire()
    pending = run.begin("step-000000001")
    pending.write(
        "model.safetensors", lambda p: save_file({"weight": torch.ones(1, 2), "bias": torch.zeros(1)}, p)
    )
    pending.commit(step=1, epoch=0, metrics={"score": 1.0})
    run.release()
    return path


def test_soup_and_export_read_model_the_same_way(
    user_code: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = _one_checkpoint_run(tmp_path / "run")
    missing = "ladle_test_models:missing"
    soup_argv = ["soup", str(run), "--recipe", "greedy:score:max", "-o", str(tmp_path / "s.safetensors")]
    assert main([*soup_argv, "--eval", "ladle_test_models:evaluate", "--model", missing]) == 2
    soup_error = capsys.readouterr().err.strip()
    export_argv = ["export", str(run / "step-000000001"), "-o", str(tmp_path / "m.pt"), "--to", "torchscript"]
    export_argv += ["--input-shape", "1,2"]
    assert main([*export_argv, "--model", missing]) == 2
    export_error = capsys.readouterr().err.strip()
    assert soup_error == export_error
    assert "--model 'ladle_test_models:missing': ladle_test_models has no attribute 'missing'" in soup_error
