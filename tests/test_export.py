"""ladle.export: inference weights as safetensors, and verified TorchScript / ONNX models."""

from __future__ import annotations

import sys
import textwrap
import warnings
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import pytest
import safetensors
import safetensors.torch
import torch

from ladle import EMA, CheckpointManager, StateMismatch
from ladle.errors import (
    ConfigError,
    ExportMismatch,
    FormatError,
    MissingDependency,
    ModelFactoryError,
    OutputExists,
)
from ladle.formats import load_source
from ladle.tools.export import export_checkpoint
from ladle.tools.export_model import export_model
from ladle.tools.export_spec import ExampleInput
from ladle.tools.export_weights import export_weights

# ONNX exports need the `onnx` extra (onnx, onnxscript, onnxruntime); the fast suite runs without it.
needs_onnx = pytest.mark.skipif(
    any(find_spec(name) is None for name in ("onnx", "onnxscript", "onnxruntime")),
    reason="needs the onnx extra: pip install 'ladle[onnx]'",
)

MODELS = """
import torch
from torch import nn


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 8, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        return self.head(self.features(x))


class TinyLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.block = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=0.0, batch_first=True)
        self.head = nn.Linear(16, 50)

    def forward(self, ids):
        return self.head(self.block(self.embed(ids)))


class Noisy(SmallCNN):
    def forward(self, x):
        return super().forward(x) + torch.rand(1)


def cnn():
    torch.manual_seed(1)
    return SmallCNN()


def lm():
    torch.manual_seed(2)
    return TinyLM()


def noisy():
    return Noisy()


def broken():
    raise RuntimeError("config file missing")


def not_a_model():
    return 42


def other_arch():
    return nn.Linear(3, 3)
"""


@pytest.fixture(scope="module")
def models_py(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("code") / "export_models.py"
    path.write_text(textwrap.dedent(MODELS))
    return path


def _module(models_py: Path):  # type: ignore[no-untyped-def]
    import importlib.util

    spec = importlib.util.spec_from_file_location("export_models_for_tests", models_py)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _train_run(path: Path, model: torch.nn.Module, make_input) -> Path:  # type: ignore[no-untyped-def]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ema = EMA(model, decay=0.5)
    with CheckpointManager(str(path), model=model, optimizer=optimizer, ema=ema) as manager:
        for step in (1, 2):
            model.train()
            model(make_input()).float().pow(2).mean().backward()
            optimizer.step()
            optimizer.zero_grad()
            ema.update()
            manager.save(step=step, epoch=0, metrics={"loss": 1.0 / step})
    return path / "step-000000002"


@pytest.fixture(scope="module")
def cnn_ckpt(models_py: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = _module(models_py).cnn()
    return _train_run(tmp_path_factory.mktemp("cnn") / "run", model, lambda: torch.randn(4, 3, 8, 8))


@pytest.fixture(scope="module")
def lm_ckpt(models_py: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = _module(models_py).lm()
    return _train_run(tmp_path_factory.mktemp("lm") / "run", model, lambda: torch.randint(0, 50, (2, 8)))


# -- safetensors -----------------------------------------------------------------------


def test_default_export_keeps_the_weights_and_drops_training_state(cnn_ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "model.safetensors"
    result = export_weights(cnn_ckpt, out)
    exported = safetensors.torch.load_file(str(out))
    with load_source(cnn_ckpt) as source:
        saved = source.state_dict()
    assert set(exported) == set(saved)
    assert all(torch.equal(exported[k], saved[k]) for k in saved)
    assert result.weights == "model" and result.tensors == len(saved)
    assert result.bytes_after == out.stat().st_size < result.bytes_before  # optimizer etc. dropped
    with safetensors.safe_open(str(out), framework="pt") as handle:
        meta = handle.metadata()
    assert meta["ladle.weights"] == "model" and meta["ladle.step"] == "2"
    assert meta["ladle.source"] == str(cnn_ckpt)


def test_safetensors_export_of_a_transformer_block_loads_into_the_model(
    models_py: Path, lm_ckpt: Path, tmp_path: Path
) -> None:
    out = tmp_path / "lm.safetensors"
    export_weights(lm_ckpt, out, ema=True, dtype="fp16")
    model = _module(models_py).lm().half()
    model.load_state_dict(safetensors.torch.load_file(str(out)))
    with load_source(lm_ckpt, key="ema") as source:
        expected = source.tensor("block.linear1.weight").half()
    assert torch.equal(model.block.linear1.weight, expected)


def test_ema_export_writes_the_ema_weights(cnn_ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "ema.safetensors"
    result = export_weights(cnn_ckpt, out, ema=True)
    exported = safetensors.torch.load_file(str(out))
    with load_source(cnn_ckpt, key="ema") as source:
        ema = source.state_dict()
    assert result.weights == "ema"
    assert all(torch.equal(exported[k], ema[k]) for k in ema)
    with load_source(cnn_ckpt) as source:
        assert not torch.equal(exported["head.weight"], source.tensor("head.weight"))


def test_cast_to_bf16_casts_floats_and_keeps_integer_buffers(cnn_ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "half.safetensors"
    result = export_weights(cnn_ckpt, out, dtype="bf16")
    exported = safetensors.torch.load_file(str(out))
    with load_source(cnn_ckpt) as source:
        original = source.state_dict()
    assert exported["head.weight"].dtype == torch.bfloat16
    assert torch.equal(exported["head.weight"], original["head.weight"].to(torch.bfloat16))
    assert exported["features.1.num_batches_tracked"].dtype == torch.int64
    assert result.dtype == "bf16"


def test_ema_weights_of_a_foreign_pickle_are_found_by_their_usual_key(tmp_path: Path) -> None:
    ckpt = tmp_path / "train.pt"
    torch.save({"model": {"w": torch.zeros(2)}, "model_ema": {"w": torch.ones(2)}, "epoch": 3}, ckpt)
    result = export_weights(ckpt, tmp_path / "out.safetensors", ema=True)
    assert result.weights == "model_ema"
    assert torch.equal(safetensors.torch.load_file(str(tmp_path / "out.safetensors"))["w"], torch.ones(2))


def test_asking_for_ema_weights_that_are_not_there_says_so(tmp_path: Path) -> None:
    ckpt = tmp_path / "plain.pt"
    torch.save({"model": {"w": torch.zeros(2)}, "epoch": 1}, ckpt)
    with pytest.raises(FormatError, match="no EMA weights"):
        export_weights(ckpt, tmp_path / "out.safetensors", ema=True)


def test_an_existing_output_is_replaced_only_with_force(cnn_ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "model.safetensors"
    out.write_bytes(b"keep me")
    with pytest.raises(OutputExists, match="already exists"):
        export_weights(cnn_ckpt, out)
    assert out.read_bytes() == b"keep me"
    export_weights(cnn_ckpt, out, force=True)
    assert len(safetensors.torch.load_file(str(out))) > 0


def test_model_options_with_a_safetensors_target_are_refused(cnn_ckpt: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="model, inputs only apply to torchscript/onnx exports"):
        export_checkpoint(cnn_ckpt, tmp_path / "o.safetensors", model="m:f", inputs=[(1, 3)])


# -- torchscript and onnx --------------------------------------------------------------


def _eager(models_py: Path, factory: str, ckpt: Path, key: str | None = None):  # type: ignore[no-untyped-def]
    model = getattr(_module(models_py), factory)()
    with load_source(ckpt, key=key) as source:
        model.load_state_dict(source.state_dict())
    return model.eval()


def test_torchscript_export_of_a_cnn_runs_like_eager(models_py: Path, cnn_ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "cnn.pt"
    result = export_model(
        cnn_ckpt, out, model=f"{models_py}:cnn", inputs=[(2, 3, 8, 8)], target="torchscript", ema=True
    )
    assert result.max_abs_diff is not None and result.max_abs_diff <= 1e-5
    assert result.weights == "ema" and result.exporter == "torch.jit.trace"
    x = torch.randn(3, 3, 8, 8)
    with warnings.catch_warnings():
        # torch.jit.load is deprecated: a DeprecationWarning in torch 2.13, a FutureWarning from 2.14
        warnings.filterwarnings("ignore", r"`torch\.jit\.load` is deprecated", DeprecationWarning)
        warnings.filterwarnings("ignore", r"`torch\.jit\.load` is deprecated", FutureWarning)
        loaded = torch.jit.load(str(out))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), _eager(models_py, "cnn", cnn_ckpt, key="ema")(x))


@needs_onnx
def test_onnx_export_of_a_cnn_matches_eager_in_onnxruntime(
    models_py: Path, cnn_ckpt: Path, tmp_path: Path
) -> None:
    import onnxruntime as ort

    out = tmp_path / "cnn.onnx"
    result = export_model(cnn_ckpt, out, model=f"{models_py}:cnn", inputs=[ExampleInput(shape=(2, 3, 8, 8))])
    assert result.target.value == "onnx" and result.max_abs_diff is not None and result.max_abs_diff <= 1e-4
    assert result.bytes_after == out.stat().st_size
    x = torch.randn(2, 3, 8, 8)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, _eager(models_py, "cnn", cnn_ckpt)(x).numpy(), atol=1e-4, rtol=1e-3)


def test_torchscript_export_of_a_transformer_block_with_token_inputs(
    models_py: Path, lm_ckpt: Path, tmp_path: Path
) -> None:
    result = export_model(
        lm_ckpt,
        tmp_path / "lm.pt",
        model=f"{models_py}:lm",
        inputs=[ExampleInput.parse("2,8", "int64")],
        target="torchscript",
    )
    assert result.inputs == [{"shape": [2, 8], "dtype": "int64"}]
    assert result.max_abs_diff is not None and result.max_abs_diff <= 1e-4


@needs_onnx
def test_onnx_export_of_a_transformer_block(models_py: Path, lm_ckpt: Path, tmp_path: Path) -> None:
    result = export_model(
        lm_ckpt,
        tmp_path / "lm.onnx",
        model=f"{models_py}:lm",
        inputs=[ExampleInput.parse("2x8", "int64")],
        ema=True,
    )
    assert result.max_abs_diff is not None and result.max_abs_diff <= 1e-4
    assert (tmp_path / "lm.onnx").stat().st_size > 0


def test_fp16_export_uses_the_looser_half_precision_tolerance(
    models_py: Path, cnn_ckpt: Path, tmp_path: Path
) -> None:
    result = export_model(
        cnn_ckpt,
        tmp_path / "h.pt",
        model=f"{models_py}:cnn",
        inputs=[(2, 3, 8, 8)],
        target="torchscript",
        dtype="fp16",
    )
    assert (result.atol, result.rtol, result.dtype) == (1e-2, 1e-2, "fp16")
    assert result.inputs == [{"shape": [2, 3, 8, 8], "dtype": "float16"}]


def test_an_export_that_disagrees_with_eager_fails_and_writes_nothing(
    models_py: Path, cnn_ckpt: Path, tmp_path: Path
) -> None:
    out = tmp_path / "noisy.pt"
    with pytest.raises(
        ExportMismatch, match=r"noisy.pt: the torchscript export disagrees with eager PyTorch: max \|diff\|"
    ):
        export_model(cnn_ckpt, out, model=f"{models_py}:noisy", inputs=[(2, 3, 8, 8)], target="torchscript")
    assert list(tmp_path.iterdir()) == []


def test_a_factory_that_raises_gives_one_clear_line(models_py: Path, cnn_ckpt: Path, tmp_path: Path) -> None:
    spec = f"{models_py}:broken"
    with pytest.raises(ModelFactoryError, match=r"the factory raised RuntimeError: config file missing"):
        export_model(cnn_ckpt, tmp_path / "x.pt", model=spec, inputs=[(1, 3, 8, 8)], target="torchscript")


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        ("nowhere_module_xyz:build", r"no module named 'nowhere_module_xyz'"),
        ("{models}:missing", r"has no attribute 'missing'; it has: Noisy, SmallCNN, TinyLM"),
        ("{models}:not_a_model", r"the factory returned a int, not a torch\.nn\.Module"),
        ("{models}", r"expected MODULE:FACTORY"),
        ("{models}:SmallCNN.forward.nothing", r"has no attribute 'nothing'"),
    ],
)
def test_a_bad_model_spec_names_the_spec(
    factory: str, message: str, models_py: Path, cnn_ckpt: Path, tmp_path: Path
) -> None:
    spec = factory.format(models=models_py)
    with pytest.raises(ModelFactoryError, match=message):
        export_model(cnn_ckpt, tmp_path / "x.pt", model=spec, inputs=[(1, 3, 8, 8)], target="torchscript")


def test_a_module_in_the_working_directory_can_be_named(
    models_py: Path, cnn_ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "cwd_models_for_export.py").write_text(models_py.read_text())
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "cwd_models_for_export", raising=False)
    result = export_model(
        cnn_ckpt, "m.pt", model="cwd_models_for_export:cnn", inputs=[(1, 3, 8, 8)], target="torchscript"
    )
    assert Path(result.output) == tmp_path / "m.pt"
    sys.modules.pop("cwd_models_for_export", None)


def test_a_model_that_does_not_fit_the_weights_is_a_state_mismatch(
    models_py: Path, cnn_ckpt: Path, tmp_path: Path
) -> None:
    with pytest.raises(StateMismatch, match="the saved weights do not fit the model"):
        export_model(
            cnn_ckpt,
            tmp_path / "x.pt",
            model=f"{models_py}:other_arch",
            inputs=[(1, 3)],
            target="torchscript",
        )


def test_an_input_shape_the_model_cannot_take_is_bad_input(
    models_py: Path, cnn_ckpt: Path, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match=r"the model fails on the example input \[1, 5\]"):
        export_model(
            cnn_ckpt, tmp_path / "x.pt", model=f"{models_py}:cnn", inputs=[(1, 5)], target="torchscript"
        )


def test_onnx_without_its_optional_packages_says_how_to_install_them(
    models_py: Path, cnn_ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("onnx", "onnxscript", "onnxruntime"):
        monkeypatch.setitem(sys.modules, name, None)  # makes `import name` fail, installed or not
    with pytest.raises(MissingDependency, match=r"optional package 'onnx'.*pip install 'ladle\[onnx\]'"):
        export_model(cnn_ckpt, tmp_path / "x.onnx", model=f"{models_py}:cnn", inputs=[(1, 3, 8, 8)])
    assert not (tmp_path / "x.onnx").exists()


@needs_onnx
def test_onnx_in_bf16_is_refused_before_any_work(models_py: Path, cnn_ckpt: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="ONNX export in bf16 cannot be checked"):
        export_model(
            cnn_ckpt, tmp_path / "x.onnx", model=f"{models_py}:cnn", inputs=[(1, 3, 8, 8)], dtype="bf16"
        )


def test_a_model_export_needs_a_model_and_an_input(cnn_ckpt: Path, models_py: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="needs the model's code: --model module:factory"):
        export_checkpoint(cnn_ckpt, tmp_path / "x.onnx", to="onnx")
    with pytest.raises(ConfigError, match="needs an example input shape"):
        export_checkpoint(cnn_ckpt, tmp_path / "x.onnx", to="onnx", model=f"{models_py}:cnn")


@pytest.mark.parametrize(
    ("shape", "dtype", "message"),
    [
        ("1,a,3", None, "is not a shape"),
        ("1,0,3", None, r"input shape \[1, 0, 3\] is not allowed"),
        ("1,3", "int99", "'int99' is not a torch dtype"),
    ],
)
def test_bad_example_inputs_are_refused(shape: str, dtype: str | None, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ExampleInput.parse(shape, dtype)
