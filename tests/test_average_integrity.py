"""Averages verify their members in the same read: checksums of the bytes read, corrupted
members refused (or skipped on request), in avg, soup and export."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path

import pytest
import torch
import xxhash
from safetensors.torch import load_file, save_file

from ladle import average, average_to_file, export_weights, soup
from ladle.averaging import integrity
from ladle.averaging.engine import BLOCK
from ladle.averaging.integrity import FileHasher, StreamHasher
from ladle.cli.main import main
from ladle.errors import CorruptCheckpoint
from ladle.store.run import Run


def _run(tmp_path: Path, count: int = 3) -> Run:
    run = Run(tmp_path / "run", create=True).acquire()
    gen = torch.Generator().manual_seed(0)
    for i in range(1, count + 1):
        state = {
            "w": torch.randn(64, 33, generator=gen),
            "b": torch.randn(7, generator=gen),
            "n": torch.tensor(i),
        }
        pending = run.begin(f"step-{i * 100:09d}")
        pending.write("model.safetensors", lambda p, s=state: save_file(s, p))
        pending.commit(step=i * 100, epoch=i, metrics={"loss": 1.0 / i})
    run.release()
    return Run(tmp_path / "run")


def _flip_a_weight_byte(path: Path) -> None:
    """Change one byte of tensor data (sizes stay right: only a checksum can tell)."""
    data = bytearray(path.read_bytes())
    data[-20] ^= 0x01
    path.write_bytes(bytes(data))


def _corrupt(tmp_path: Path) -> Path:
    target = tmp_path / "run" / "step-000000200" / "model.safetensors"
    _flip_a_weight_byte(target)
    return target


def test_the_recorded_checksum_is_the_sha256_of_each_file_read(tmp_path: Path) -> None:
    _run(tmp_path)
    result = average_to_file([tmp_path / "run"], tmp_path / "o.safetensors")
    for entry in result.provenance["members"]:
        expected = hashlib.sha256((Path(entry["path"]) / "model.safetensors").read_bytes()).hexdigest()
        assert entry["sha256"] == expected
        assert entry["xxh3_128"] == xxhash.xxh3_128_hexdigest(
            (Path(entry["path"]) / "model.safetensors").read_bytes()
        )


def test_torch_pickles_are_hashed_in_the_same_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    paths = []
    for i in range(2):
        paths.append(tmp_path / f"c{i}.pt")
        torch.save({"w": torch.randn(512, 512), "step": torch.tensor(i)}, paths[-1])
    # The engine reads with os.preadv; the checksum reads with os.pread only what the engine skips.
    filled: list[int] = []
    pread = os.pread

    def counting(fd: int, n: int, offset: int) -> bytes:
        data = pread(fd, n, offset)
        filled.append(len(data))
        return data

    monkeypatch.setattr(os, "pread", counting)
    result = average_to_file(paths, tmp_path / "o.safetensors")
    for path, entry in zip(paths, result.provenance["members"], strict=True):
        assert entry["xxh3_128"] == xxhash.xxh3_128_hexdigest(path.read_bytes())
    # Only what the average does not read (zip records, the pickle, the integer tensor) is read
    # again for the checksum: not the 1 MiB of weights of each file.
    assert sum(filled) < 2 * 64 * 1024


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_each_file_is_hashed_in_read_order_whichever_thread_takes_its_batches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, suffix: str
) -> None:
    # Every block its own job, three queued per member, four threads for five members, and
    # each file's first block slow to hash: a member's later jobs go to other threads meanwhile
    # and must wait. Hashed out of order, the checksum would read the skipped bytes again
    # from the file (a gap) and the same read would no longer be the one hashed.
    monkeypatch.setattr(StreamHasher, "CHUNK", 1)
    monkeypatch.setattr(StreamHasher, "AHEAD", 3)
    monkeypatch.setattr(integrity, "_usable_cpus", lambda: 5)  # one left to the engine
    feed, fill = FileHasher.feed, FileHasher._fill
    gaps: list[int] = []

    def slow_first(self: FileHasher, offset: int, data: memoryview) -> None:
        if self._pos == 0:
            time.sleep(0.05)
        feed(self, offset, data)

    def counted(self: FileHasher, upto: int | None) -> None:
        if upto is not None:
            gaps.append(upto - self._pos)
        fill(self, upto)

    monkeypatch.setattr(FileHasher, "feed", slow_first)
    monkeypatch.setattr(FileHasher, "_fill", counted)
    gen = torch.Generator().manual_seed(3)
    paths = []
    for i in range(5):
        # Keys of several blocks, of part of one, and small ones between them.
        state = {
            "a": torch.randn(3 * BLOCK + 17, generator=gen),
            "b": torch.randn(5, generator=gen),
            "c": torch.randn(BLOCK // 3, generator=gen),
            "d": torch.randn(2 * BLOCK, generator=gen),
            "n": torch.tensor(i),
        }
        paths.append(tmp_path / f"m{i}{suffix}")
        if suffix == ".pt":
            torch.save(state, paths[-1])
        else:
            save_file(state, paths[-1])
    result = average_to_file(paths, tmp_path / "o.safetensors")
    for path, entry in zip(paths, result.provenance["members"], strict=True):
        assert entry["xxh3_128"] == xxhash.xxh3_128_hexdigest(path.read_bytes())
    # Only what the average never reads (headers, zip records, the integer tensor) is a gap.
    assert max(gaps) < 4096


def test_a_corrupted_member_is_refused_with_one_line_naming_the_file(tmp_path: Path) -> None:
    _run(tmp_path)
    bad = _corrupt(tmp_path)
    out = tmp_path / "o.safetensors"
    with pytest.raises(CorruptCheckpoint) as caught:
        average_to_file([tmp_path / "run"], out)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"{bad}: the bytes read hash to xxh3_128 ")
    assert "--skip-corrupt" in message
    assert not out.exists() and not (tmp_path / "o.safetensors.json").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".o.safetensors.tmp-")]


def test_skip_corrupt_leaves_the_member_out_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run = _run(tmp_path)
    _corrupt(tmp_path)
    good = [load_file(str(Path(c.path) / "model.safetensors")) for c in run.checkpoints() if c.step != 200]
    with caplog.at_level(logging.WARNING, logger="ladle"):
        result = average_to_file([tmp_path / "run"], tmp_path / "o.safetensors", skip_corrupt=True)
    assert "step-000000200/model.safetensors: the bytes read hash to" in caplog.text
    assert [m["step"] for m in result.provenance["members"]] == [100, 300]
    assert result.weights == [0.5, 0.5]
    assert result.provenance["skipped_corrupt"] == [str(tmp_path / "run" / "step-000000200")]
    torch.testing.assert_close(
        load_file(str(tmp_path / "o.safetensors"))["w"], (good[0]["w"] + good[1]["w"]) / 2
    )


def test_the_in_memory_average_verifies_too(tmp_path: Path) -> None:
    _run(tmp_path)
    _corrupt(tmp_path)
    with pytest.raises(CorruptCheckpoint, match=r"step-000000200/model\.safetensors: the bytes read"):
        average([tmp_path / "run"])
    assert average([tmp_path / "run"], skip_corrupt=True)["n"].item() == 3


def test_a_soup_refuses_or_skips_a_corrupted_member(tmp_path: Path) -> None:
    _run(tmp_path)
    _corrupt(tmp_path)
    with pytest.raises(CorruptCheckpoint, match=r"step-000000200/model\.safetensors"):
        soup(tmp_path / "run", "last:3", output=tmp_path / "s.safetensors")
    result = soup(tmp_path / "run", "last:3", output=tmp_path / "s.safetensors", skip_corrupt=True)
    assert [m.step for m in result.members] == [100, 300]


def test_a_greedy_soup_checks_its_candidates_before_the_search(tmp_path: Path) -> None:
    _run(tmp_path)
    _corrupt(tmp_path)
    calls: list[int] = []

    def evaluate(state: dict[str, torch.Tensor]) -> float:
        calls.append(1)
        return float(state["w"].sum())

    with pytest.raises(CorruptCheckpoint, match=r"step-000000200/model\.safetensors"):
        soup(tmp_path / "run", "greedy:score:max", evaluate=evaluate)
    assert calls == []


def test_export_refuses_a_corrupted_checkpoint_and_writes_nothing(tmp_path: Path) -> None:
    _run(tmp_path)
    _corrupt(tmp_path)
    out = tmp_path / "model.safetensors"
    with pytest.raises(CorruptCheckpoint, match=r"step-000000200/model\.safetensors: the bytes read"):
        export_weights(tmp_path / "run" / "step-000000200", out)
    assert not out.exists()
    export_weights(tmp_path / "run" / "step-000000100", out)
    assert set(load_file(str(out))) == {"w", "b", "n"}


def test_cli_avg_exits_2_on_a_corrupted_member_and_skips_it_on_request(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _run(tmp_path)
    _corrupt(tmp_path)
    out = str(tmp_path / "o.safetensors")
    assert main(["avg", str(tmp_path / "run"), "-o", out]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "step-000000200/model.safetensors: the bytes read hash" in lines[0]
    assert main(["avg", str(tmp_path / "run"), "-o", out, "--skip-corrupt", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert [m["step"] for m in record["members"]] == [100, 300]


def test_an_error_while_hashing_stops_the_average_and_writes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(StreamHasher, "CHUNK", 1)
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"m{i}.safetensors")
        save_file({"w": torch.full((2 * BLOCK,), float(i))}, paths[-1])
    calls = {"n": 0}
    feed = FileHasher.feed

    def failing(self: FileHasher, offset: int, data: memoryview) -> None:
        calls["n"] += 1
        if calls["n"] == 4:
            raise OSError(5, "Input/output error")
        feed(self, offset, data)

    monkeypatch.setattr(FileHasher, "feed", failing)
    with pytest.raises(OSError, match="Input/output error"):
        average_to_file(paths, tmp_path / "o.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in paths)
