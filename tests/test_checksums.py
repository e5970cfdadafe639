"""Every committed file carries a sha256 (its identity) and an xxh3-128 (what reads verify
against, at a fraction of the cost of reading); checkpoints saved before the xxh3-128 was
recorded are verified against their sha256."""

from __future__ import annotations

import hashlib
import json
import secrets
from pathlib import Path

import fsspec
import pytest
import torch
import xxhash
from torch import nn

import ladle
from ladle import average_to_file
from ladle.errors import CorruptCheckpoint
from ladle.store.checkpoint import seal_meta
from ladle.store.checksums import ALGORITHMS, SHA256, XXH3_128, checksum_file, file_checksums, new_digest
from ladle.store.layout import META_NAME
from ladle.store.run import Run
from ladle.store.storage import LocalStorage
from ladle.store.verification import verify_path


def _manager(run_dir: str | Path, model: nn.Module) -> ladle.CheckpointManager:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    return ladle.CheckpointManager(run_dir, model=model, optimizer=optimizer)


def _save(run_dir: str, model: nn.Module, steps: int = 2) -> None:
    manager = _manager(run_dir, model)
    for step in range(1, steps + 1):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.5)
        manager.step(step)
        manager.save(metrics={"loss": 1.0 / step})
    manager.close()


def _strip_xxh3(checkpoint: Path) -> None:
    """Rewrite a checkpoint's meta.json as a ladle version before xxh3-128 would have: sha256 only."""
    meta = json.loads((checkpoint / META_NAME).read_bytes())
    del meta["meta_sha256"]
    for record in meta["files"].values():
        del record["xxh3_128"]
    (checkpoint / META_NAME).write_bytes(seal_meta(json.dumps(meta, indent=1).encode()))


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("where", ["local", "memory"])
def test_a_commit_records_the_sha256_and_the_xxh3_128_of_every_file(
    where: str, tmp_path: Path, model: nn.Module
) -> None:
    run_dir = str(tmp_path / "run") if where == "local" else f"memory://ladle-{secrets.token_hex(6)}/run"
    _save(run_dir, model)
    fs, _ = fsspec.core.url_to_fs(run_dir)
    for info in Run(run_dir).checkpoints():
        assert {"model.safetensors", "state.pt"} <= set(info.files)
        for filename, record in info.files.items():
            data = fs.cat_file(info.file(filename))
            assert (record.size, record.sha256, record.xxh3_128) == (
                len(data),
                hashlib.sha256(data).hexdigest(),
                xxhash.xxh3_128_hexdigest(data),
            )


def test_file_checksums_takes_every_recorded_checksum_in_one_read(tmp_path: Path) -> None:
    path = tmp_path / "f.bin"
    data = torch.randint(0, 256, (3 * (8 << 20) + 5,), dtype=torch.uint8).numpy().tobytes()
    path.write_bytes(data)
    storage = LocalStorage()
    assert file_checksums(storage, str(path)) == {
        SHA256: hashlib.sha256(data).hexdigest(),
        XXH3_128: xxhash.xxh3_128_hexdigest(data),
    }
    assert set(ALGORITHMS) == {SHA256, XXH3_128}
    assert checksum_file(storage, str(path), XXH3_128) == xxhash.xxh3_128_hexdigest(data)
    with pytest.raises(ValueError, match="unknown checksum 'md5'"):
        new_digest("md5")


def test_every_reader_refuses_a_file_whose_xxh3_128_differs(tmp_path: Path, model: nn.Module) -> None:
    run_dir = tmp_path / "run"
    _save(str(run_dir), model)
    latest = Run(run_dir).latest()
    assert latest is not None
    weights = Path(latest.file("model.safetensors"))
    _flip_last_byte(weights)
    problems = Run(run_dir).verify(latest.name)
    assert problems == [f"{weights}: xxh3_128 {problems[0].split('xxh3_128 ')[1]}"]
    with pytest.raises(CorruptCheckpoint, match=r"model.safetensors: checksum does not match meta.json"):
        _manager(run_dir, model).resume()
    with pytest.raises(CorruptCheckpoint, match=r"the bytes read hash to xxh3_128 "):
        average_to_file([latest.path], tmp_path / "o.safetensors")


def test_a_checkpoint_saved_before_xxh3_128_is_verified_against_its_sha256(
    tmp_path: Path, model: nn.Module
) -> None:
    run_dir = tmp_path / "run"
    _save(str(run_dir), model)
    old, newest = (Path(c.path) for c in Run(run_dir).checkpoints())
    for checkpoint in (old, newest):
        _strip_xxh3(checkpoint)
    run = Run(run_dir)
    assert all(r.xxh3_128 == "" and r.checksum().algorithm == SHA256 for r in run.latest().files.values())
    assert run.verify() == [] and verify_path(run_dir).ok
    # Intact: averaged, and the provenance records the sha256 of the bytes read.
    result = average_to_file([old, newest], tmp_path / "o.safetensors")
    for entry, folder in zip(result.provenance["members"], (old, newest), strict=True):
        assert entry["sha256"] == hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
        assert XXH3_128 not in entry
    # Changed: every reader names the file.
    _flip_last_byte(newest / "model.safetensors")
    assert [p.split(": ")[1].split(" ")[0] for p in Run(run_dir).verify()] == [SHA256]
    with pytest.raises(CorruptCheckpoint, match=r"the bytes read hash to sha256 "):
        average_to_file([newest], tmp_path / "p.safetensors")
    with pytest.raises(CorruptCheckpoint, match=r"checksum does not match meta.json"):
        _manager(run_dir, model).resume()
    # The previous checkpoint is intact, so a fallback resume takes it.
    manager = _manager(run_dir, model)
    assert manager.resume(fallback=True).checkpoint.name == old.name
    manager.close()


def test_a_meta_json_of_an_older_ladle_without_xxh3_128_reads_as_before(
    tmp_path: Path, model: nn.Module
) -> None:
    # What earlier versions wrote: {"size", "sha256"} per file; a reader of that version ignores
    # the added member, so its runs and new runs stay readable by both.
    run_dir = tmp_path / "run"
    _save(str(run_dir), model, steps=1)
    latest = Run(run_dir).latest()
    assert latest is not None
    entry = json.loads(Path(latest.path, META_NAME).read_bytes())["files"]["model.safetensors"]
    assert set(entry) == {"size", "sha256", "xxh3_128"}
    _strip_xxh3(Path(latest.path))
    entry = json.loads(Path(latest.path, META_NAME).read_bytes())["files"]["model.safetensors"]
    assert set(entry) == {"size", "sha256"}
    assert Run(run_dir).latest().files["model.safetensors"].sha256 == latest.files["model.safetensors"].sha256
