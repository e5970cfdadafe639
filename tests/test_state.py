"""Reading a manager checkpoint back (ladle.state.readers): weights, payload, EMA; every failure
names the file, and reading from an object store leaves no temporary file behind."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch

import ladle
from ladle.errors import CorruptCheckpoint, StateMismatch
from ladle.state.readers import read_ema_weights, read_model_weights, read_state
from ladle.store.paths import local_copy
from ladle.store.storage import storage_for
from tests.conftest import tiny_model


def saved(tmp_path: Path, *, ema: bool = False) -> tuple[ladle.Run, ladle.CheckpointInfo]:
    model = tiny_model()
    extra = {"ema": ladle.EMA(model, decay=0.5)} if ema else {}
    with ladle.CheckpointManager(tmp_path / "run", model=model, **extra) as manager:
        info = manager.save(step=1)
    return ladle.Run(tmp_path / "run"), info


def test_model_weights_read_back_exactly(tmp_path: Path) -> None:
    run, info = saved(tmp_path)
    weights = read_model_weights(run.storage, info, {"model": tiny_model(seed=5)}, strict=True)
    torch.testing.assert_close(weights["model"], tiny_model().state_dict())


def test_weights_that_do_not_fit_the_live_model_are_a_state_mismatch(tmp_path: Path) -> None:
    run, info = saved(tmp_path)
    with pytest.raises(StateMismatch, match="model.safetensors"):
        read_model_weights(run.storage, info, {"model": tiny_model(hidden=3)}, strict=True)
    with pytest.raises(StateMismatch, match=r"holds no weights for model 'other'"):
        read_model_weights(run.storage, info, {"other": tiny_model()}, strict=True)


def test_an_unreadable_state_file_is_corrupt_and_names_the_file(tmp_path: Path) -> None:
    run, info = saved(tmp_path)
    Path(info.file("state.pt")).write_bytes(b"not a pickle")
    with pytest.raises(CorruptCheckpoint, match=r"state\.pt: cannot be read .*fallback=True"):
        read_state(run.storage, info)


def test_the_payload_and_ema_weights_read_back(tmp_path: Path) -> None:
    run, info = saved(tmp_path, ema=True)
    payload = read_state(run.storage, info)
    assert payload is not None and set(payload["objects"]) == {"ema", "manager"}
    ema = read_ema_weights(run.storage, info)
    assert ema is not None and set(ema) == set(tiny_model().state_dict())


def test_an_object_store_copy_is_removed_after_reading(tmp_path: Path, monkeypatch) -> None:
    pytest.importorskip("fsspec")
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    storage, path = storage_for("memory://ladle-readers-test/file.bin")
    with storage.open(path, "wb") as handle:
        handle.write(b"12345")
    with local_copy(path, storage=storage) as local:
        assert Path(local).read_bytes() == b"12345" and Path(local).parent == scratch
    assert list(scratch.iterdir()) == []
    with pytest.raises(RuntimeError), local_copy(path, storage=storage):
        raise RuntimeError("reading failed")
    assert list(scratch.iterdir()) == []
