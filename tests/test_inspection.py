"""Library side of the inspection tools: inspect_checkpoint, diff, verification, pickle scans."""

from __future__ import annotations

import argparse
import fractions
import json
import math
import os
import pickle
from pathlib import Path

import pytest
import safetensors.torch
import torch
from torch import nn

from ladle import EMA, CheckpointManager, CheckpointNotFound, Run
from ladle.errors import ConfigError, FormatError, NotARunDirectory
from ladle.state.contents import StateKind, classify
from ladle.state.pickle_scan import Opaque, TensorStub, TorchArchive, scan_pickle
from ladle.store.verification import verify_path
from ladle.tools.diff import diff_checkpoints
from ladle.tools.inspection import inspect_checkpoint


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))


def _make_run(path: Path, steps: int = 3) -> Path:
    """A real run written by the manager: model, AdamW, StepLR and an EMA."""
    model = _net()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=10)
    ema = EMA(model, decay=0.9, warmup="ratio")
    generator = torch.Generator().manual_seed(0)
    with CheckpointManager(
        str(path), model=model, optimizer=optimizer, scheduler=scheduler, ema=ema, monitor="val_loss"
    ) as manager:
        for step in range(1, steps + 1):
            loss = model(torch.randn(16, 4, generator=generator)).pow(2).mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            scheduler.step()
            ema.update()
            manager.save(step=step * 100, epoch=step, metrics={"val_loss": 1.0 / step})
    return path


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _make_run(tmp_path_factory.mktemp("inspection") / "run")


# -- inspect ---------------------------------------------------------------------------


def test_inspect_a_ladle_checkpoint_lists_tensors_meta_and_training_state(run_dir: Path) -> None:
    result = inspect_checkpoint(run_dir / "step-000000200")
    assert result.format == "ladle" and result.weights == "model"
    names = {t.name for t in result.tensors}
    assert names == set(_net().state_dict())
    assert result.numel == sum(t.numel() for t in _net().state_dict().values())
    assert result.checkpoint is not None and result.checkpoint["step"] == 200
    assert result.checkpoint["metrics"] == {"val_loss": 0.5}
    kinds = {item.name: item.kind for item in result.training_state}
    assert kinds["ema.safetensors"] is StateKind.EMA
    assert kinds["objects.optimizer"] is StateKind.OPTIMIZER
    assert kinds["objects.scheduler"] is StateKind.SCHEDULER
    assert kinds["rng"] is StateKind.RNG
    summaries = {item.name: item.summary for item in result.training_state}
    assert "Adam-style" in summaries["objects.optimizer"] and "lr 0.01" in summaries["objects.optimizer"]
    assert "decay 0.9, warm-up ratio, 2 averaging updates" in summaries["objects.ema"]
    assert result.file_bytes == sum(result.files.values()) > result.tensor_bytes


def test_inspect_the_ema_weights_of_a_ladle_checkpoint(run_dir: Path) -> None:
    result = inspect_checkpoint(run_dir / "step-000000100", key="ema")
    assert result.weights == "ema"
    assert {t.name for t in result.tensors} == set(_net().state_dict())


def test_inspect_a_run_shows_its_latest_checkpoint(run_dir: Path) -> None:
    result = inspect_checkpoint(run_dir)
    assert result.checkpoint is not None and result.checkpoint["name"] == "step-000000300"
    assert result.notes == ["a run with 3 checkpoints; showing the latest, step-000000300"]


def test_inspect_an_empty_run_says_there_is_nothing(tmp_path: Path) -> None:
    Run(tmp_path / "empty", create=True).acquire().release()
    (tmp_path / "empty" / "ladle.json").touch(exist_ok=True)
    with pytest.raises(CheckpointNotFound, match="a run without checkpoints"):
        inspect_checkpoint(tmp_path / "empty")


def test_inspect_a_safetensors_file_counts_dtypes_and_ties(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    safetensors.torch.save_file(
        {
            "a.weight": torch.zeros(3, 4),
            "a.bias": torch.zeros(3, dtype=torch.float16),
            "n": torch.zeros(2, dtype=torch.int64),
        },
        str(path),
    )
    result = inspect_checkpoint(path)
    assert result.format == "safetensors" and result.training_state == []
    totals = {d.dtype: (d.tensors, d.numel, d.nbytes) for d in result.by_dtype()}
    assert totals == {"float32": (1, 12, 48), "float16": (1, 3, 6), "int64": (1, 2, 16)}
    assert result.file_bytes == os.path.getsize(path)
    assert result.by_module() == {"a": 15, "(top level)": 2}


def test_inspect_a_training_pickle_reports_its_state_without_unpickling_code(tmp_path: Path) -> None:
    model = _net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 4)).sum().backward()
    optimizer.step()
    path = tmp_path / "train.pt"
    torch.save(
        {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scaler": {
                "scale": 1024.0,
                "growth_factor": 2.0,
                "backoff_factor": 0.5,
                "growth_interval": 2000,
                "_growth_tracker": 3,
            },
            "model_ema": model.state_dict(),
            "epoch": 7,
        },
        path,
    )
    result = inspect_checkpoint(path)
    assert {t.name for t in result.tensors} == set(model.state_dict())
    kinds = {item.name: item.kind for item in result.training_state}
    assert kinds == {
        "model": StateKind.WEIGHTS,
        "optimizer": StateKind.OPTIMIZER,
        "scaler": StateKind.GRAD_SCALER,
        "model_ema": StateKind.EMA,
        "epoch": StateKind.COUNTER,
    }
    summaries = {item.name: item.summary for item in result.training_state}
    assert summaries["optimizer"].startswith("SGD with momentum: 1 param group, state for 6 of 6 params")
    assert summaries["scaler"] == "scale=1024, _growth_tracker=3, growth_interval=2000"


def test_a_pickle_that_needs_trust_is_described_from_its_structure(tmp_path: Path) -> None:
    path = tmp_path / "with_args.ckpt"
    torch.save({"state_dict": _net().state_dict(), "args": fractions.Fraction(1, 10), "epoch": 2}, path)
    result = inspect_checkpoint(path)
    assert result.tensors == []
    assert "needs --trust" in result.notes[0] and "fractions.Fraction" in result.notes[0]
    state = {item.name: item for item in result.training_state}
    assert state["state_dict"].kind is StateKind.WEIGHTS and state["state_dict"].tensors == 9
    assert state["args"].summary == "fractions.Fraction object (loading it needs --trust)"


def test_trust_lists_the_tensors_of_such_a_pickle(tmp_path: Path) -> None:
    path = tmp_path / "with_args.ckpt"
    torch.save({"state_dict": _net().state_dict(), "args": fractions.Fraction(1, 10)}, path)
    result = inspect_checkpoint(path, trust=True)
    assert len(result.tensors) == 9 and result.notes == []


def test_a_transformers_style_folder_reports_its_trainer_files(tmp_path: Path) -> None:
    folder = tmp_path / "checkpoint-500"
    folder.mkdir()
    model = _net()
    safetensors.torch.save_file(model.state_dict(), str(folder / "model.safetensors"))
    optimizer = torch.optim.AdamW(model.parameters())
    torch.save(optimizer.state_dict(), folder / "optimizer.pt")
    torch.save({"python": 1, "cpu": torch.get_rng_state()}, folder / "rng_state.pth")
    (folder / "trainer_state.json").write_text(
        json.dumps({"global_step": 500, "epoch": 1.5, "log_history": [{}, {}]})
    )
    result = inspect_checkpoint(folder)
    state = {item.name: item for item in result.training_state}
    assert state["optimizer.pt"].kind is StateKind.OPTIMIZER
    assert state["rng_state.pth"].kind is StateKind.RNG
    assert state["trainer_state.json"].summary == "global_step 500, epoch 1.5, 2 log records"


def test_inspecting_a_missing_path_names_it(tmp_path: Path) -> None:
    with pytest.raises(CheckpointNotFound, match="nothing.pt: no such file"):
        inspect_checkpoint(tmp_path / "nothing.pt")


# -- pickle scan -----------------------------------------------------------------------


class _Boom:
    """Unpickling this for real would create a file."""

    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (open, (self.target, "w"))


def test_scanning_a_pickle_runs_none_of_its_code(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"weights": torch.zeros(2, 3, dtype=torch.float16), "payload": _Boom(str(marker))}, path)
    scan = scan_pickle(str(path))
    assert not marker.exists()
    # The global is named as this Python pickles it: io.open up to 3.11, _io.open from 3.12.
    assert scan.globals == [f"{open.__module__}.open"]
    assert isinstance(scan.obj["payload"], Opaque)
    assert scan.obj["weights"] == TensorStub(shape=(2, 3), dtype="float16")


def test_scanning_reads_legacy_torch_files_and_plain_pickles(tmp_path: Path) -> None:
    legacy = tmp_path / "legacy.pt"
    torch.save({"w": torch.zeros(4, dtype=torch.int32)}, legacy, _use_new_zipfile_serialization=False)
    assert scan_pickle(str(legacy)).obj == {"w": TensorStub(shape=(4,), dtype="int32")}
    plain = tmp_path / "plain.pkl"
    plain.write_bytes(pickle.dumps({"lr": 0.1, "ns": argparse.Namespace(a=1)}))
    scan = scan_pickle(str(plain))
    assert scan.obj["lr"] == 0.1 and scan.globals == ["argparse.Namespace"]


def test_scanning_a_file_that_is_no_pickle_is_a_format_error(tmp_path: Path) -> None:
    path = tmp_path / "junk.pt"
    path.write_bytes(b"\x00not a pickle at all")
    with pytest.raises(FormatError, match="junk.pt: not a readable pickle"):
        scan_pickle(str(path))


@pytest.mark.parametrize(
    ("name", "value", "kind"),
    [
        ("optimizer_states", [{"state": {}, "param_groups": []}], StateKind.OPTIMIZER),
        ("lr_schedulers", [{"last_epoch": 3, "_last_lr": [0.1], "base_lrs": [0.1]}], StateKind.SCHEDULER),
        ("state_dict_ema", {"w": torch.zeros(1)}, StateKind.EMA),
        ("global_step", 1200, StateKind.COUNTER),
        ("hyper_parameters", {"lr": 0.1}, StateKind.CONFIG),
        ("callbacks", {"EarlyStopping{'monitor': 'val'}": {}}, StateKind.CALLBACKS),
        ("torch_rng_state", torch.zeros(8, dtype=torch.uint8), StateKind.RNG),
        ("pytorch-lightning_version", "2.4.0", StateKind.OBJECT),
    ],
)
def test_training_state_is_classified_by_structure_then_name(
    name: str, value: object, kind: StateKind
) -> None:
    assert classify(name, value) is kind


# -- diff ------------------------------------------------------------------------------


def _save(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    safetensors.torch.save_file({k: v.clone() for k, v in tensors.items()}, str(path))
    return path


def test_diff_of_a_file_with_itself_is_identical(tmp_path: Path) -> None:
    a = _save(tmp_path / "a.safetensors", {"w": torch.randn(4, 4), "nan": torch.tensor([math.nan, 1.0])})
    result = diff_checkpoints(a, a)
    assert result.same and result.identical == 2
    assert result.summary() == "identical: 2 tensors, bitwise equal"


def test_diff_reports_keys_shapes_dtypes_and_distances(tmp_path: Path) -> None:
    base = torch.arange(6, dtype=torch.float32).reshape(2, 3) + 1
    a = _save(
        tmp_path / "a.safetensors",
        {"same": base, "small": base, "big": base, "shape": base, "dtype": base, "gone": base},
    )
    b = _save(
        tmp_path / "b.safetensors",
        {
            "same": base,
            "small": base + 0.001,
            "big": base * 2,
            "shape": base.reshape(3, 2),
            "dtype": base.double(),
            "new": base,
        },
    )
    result = diff_checkpoints(a, b)
    assert not result.same
    assert (result.only_a, result.only_b) == (["gone"], ["new"])
    assert [c.name for c in result.shape_changes] == ["shape"]
    assert [(c.name, c.dtype_a, c.dtype_b, c.l2) for c in result.dtype_changes] == [
        ("dtype", "float32", "float64", 0.0)
    ]
    assert [c.name for c in result.value_changes] == ["big", "small"]  # largest relative change first
    big = result.value_changes[0]
    norm = math.sqrt(sum(v * v for v in range(1, 7)))
    assert big.l2 == pytest.approx(norm) and big.relative == pytest.approx(1.0) and big.max_abs == 6.0
    assert result.identical == 1
    assert result.summary() == (
        "different: 3 of 5 shared tensors changed (largest relative change 1 in big), "
        "1 shape changes, 1 dtype changes, 1 only in A, 1 only in B"
    )


def test_diff_atol_treats_tiny_changes_as_equal(tmp_path: Path) -> None:
    a = _save(tmp_path / "a.safetensors", {"w": torch.ones(3)})
    b = _save(tmp_path / "b.safetensors", {"w": torch.ones(3) + 1e-6})
    assert not diff_checkpoints(a, b).same
    assert diff_checkpoints(a, b, atol=1e-5).same


def test_diff_ranks_a_tensor_that_became_nan_first(tmp_path: Path) -> None:
    a = _save(tmp_path / "a.safetensors", {"big": torch.ones(3), "nan": torch.ones(3)})
    b = _save(
        tmp_path / "b.safetensors", {"big": torch.ones(3) * 10, "nan": torch.tensor([1.0, math.nan, 1.0])}
    )
    changes = diff_checkpoints(a, b).value_changes
    assert [c.name for c in changes] == ["nan", "big"]
    assert math.isnan(changes[0].l2)


def test_diff_compares_raw_and_ema_weights_of_one_checkpoint(run_dir: Path) -> None:
    ckpt = run_dir / "step-000000300"
    result = diff_checkpoints(ckpt, ckpt, key_b="ema")
    assert not result.same and not result.only_a and not result.only_b
    assert {c.name for c in result.value_changes} >= {"0.weight", "3.weight"}


def test_diff_rejects_a_negative_tolerance(tmp_path: Path) -> None:
    a = _save(tmp_path / "a.safetensors", {"w": torch.ones(1)})
    with pytest.raises(ConfigError, match=r"atol=-1 is not allowed"):
        diff_checkpoints(a, a, atol=-1)


# -- verification ----------------------------------------------------------------------


def test_verify_a_healthy_run(tmp_path: Path) -> None:
    run = _make_run(tmp_path / "run", steps=2)
    result = verify_path(run)
    assert result.ok and [c.name for c in result.checkpoints] == ["step-000000100", "step-000000200"]
    assert all(c.files >= 3 for c in result.checkpoints)


def test_verify_names_a_changed_file_and_an_unreadable_meta(tmp_path: Path) -> None:
    run = _make_run(tmp_path / "run", steps=3)
    weights = run / "step-000000200" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    (run / "step-000000300" / "meta.json").write_text("{not json")
    seen: list[str] = []
    result = verify_path(run, progress=lambda name, done, total: seen.append(f"{name} {done}/{total}"))
    assert not result.ok
    bad = {c.name: c.problems for c in result.checkpoints if not c.ok}
    assert list(bad) == ["step-000000200", "step-000000300"]
    assert bad["step-000000200"][0].startswith(f"{weights}: xxh3_128 ")
    assert "does not match meta.json" in bad["step-000000200"][0]
    assert "meta.json: unreadable" in bad["step-000000300"][0]
    assert seen == ["step-000000100 0/3", "step-000000200 1/3", "step-000000300 2/3"]


def test_verify_one_checkpoint_and_a_missing_file(tmp_path: Path) -> None:
    run = _make_run(tmp_path / "run", steps=2)
    (run / "step-000000100" / "ema.safetensors").unlink()
    result = verify_path(run / "step-000000100")
    assert [c.name for c in result.checkpoints] == ["step-000000100"]
    assert result.problems == [f"{run / 'step-000000100' / 'ema.safetensors'}: missing (meta.json lists it)"]


def test_verify_flags_a_folder_of_weights_without_meta(tmp_path: Path) -> None:
    run = _make_run(tmp_path / "run", steps=1)
    stray = run / "step-000000999"
    stray.mkdir()
    _save(stray / "model.safetensors", {"w": torch.ones(1)})
    (run / "tensorboard").mkdir()  # user folders without weights are left alone
    result = verify_path(run)
    assert [c.name for c in result.checkpoints if not c.ok] == ["step-000000999"]
    assert "meta.json: missing, so step-000000999 is not a checkpoint" in result.problems[0]


def test_verify_refuses_a_plain_file(tmp_path: Path) -> None:
    path = _save(tmp_path / "w.safetensors", {"w": torch.ones(1)})
    with pytest.raises(NotARunDirectory, match="a file, not a run or a ladle checkpoint folder"):
        verify_path(path)


def test_verify_a_run_behind_an_fsspec_url() -> None:
    run = Run("memory://ladle-verify-test/run", create=True).acquire()
    pending = run.begin("step-000000001")
    pending.write("model.safetensors", lambda p: safetensors.torch.save_file({"w": torch.ones(3)}, p))
    pending.commit(step=1)
    run.release()
    assert verify_path("memory://ladle-verify-test/run").ok
    import fsspec

    fs = fsspec.filesystem("memory")
    fs.pipe("/ladle-verify-test/run/step-000000001/model.safetensors", b"garbage")
    result = verify_path("memory://ladle-verify-test/run")
    assert not result.ok and "model.safetensors: size 7 bytes" in result.problems[0]


def test_a_torch_archive_reads_one_element_tensors_and_nothing_of_the_others(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ladle.store.ranged import LocalRangedFile

    scores = {
        "f32": torch.tensor(0.375),
        "f64": torch.tensor(0.1, dtype=torch.float64),
        "f16": torch.tensor(1.5, dtype=torch.float16),
        "bf16": torch.tensor(-2.5, dtype=torch.bfloat16),
        "i64": torch.tensor(7),
        "view": torch.arange(10.0)[3],  # one element at an offset inside a larger storage
    }
    path = tmp_path / "c.ckpt"
    torch.save({"weights": torch.zeros(1 << 20), "scores": scores}, path)
    read: list[int] = []
    original = LocalRangedFile.read_range

    def counted(self: LocalRangedFile, offset: int, count: int) -> bytes:
        data = original(self, offset, count)
        read.append(len(data))
        return data

    monkeypatch.setattr(LocalRangedFile, "read_range", counted)
    with TorchArchive(str(path)) as archive:
        found = archive.scan().obj
        values = {name: archive.scalar(stub) for name, stub in found["scores"].items()}
        assert archive.scalar(found["weights"]) is None  # not one element: never read
    assert values == {name: float(t) for name, t in scores.items()}
    assert sum(read) < path.stat().st_size // 8  # the 4 MiB of weights were not read
