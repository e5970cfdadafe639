"""ladle.averaging.provenance: the record kept with every average, and that an output never
exists without it (nor leaves temporary files behind when its writer is killed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import xxhash
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ladle import average_to_file, read_provenance, soup
from ladle.averaging.provenance import PROVENANCE_KEY
from ladle.errors import OutputExists
from ladle.formats.source import TensorInfo
from ladle.formats.write import SafetensorsWriter, remove_stale_temporaries
from tests.conftest import scalar_run as _run


def _st(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    save_file(tensors, str(path))
    return path


def test_average_to_file_records_provenance(tmp_path: Path) -> None:
    _run(tmp_path, [1.0, 3.0])
    loose = _st(tmp_path / "loose.safetensors", {"w": torch.tensor([5.0]), "n": torch.tensor(9)})
    out = tmp_path / "soup.safetensors"
    result = average_to_file([tmp_path / "run", loose], out, weights="1,1,2", recipe="hand-picked")
    assert load_file(str(out))["w"].tolist() == [3.5]
    record = read_provenance(out)
    assert record == json.loads((tmp_path / "soup.safetensors.json").read_text())
    assert record == result.provenance
    assert record["recipe"] == "hand-picked"
    assert record["weighting"] == "1,1,2"
    assert [m["weight"] for m in record["members"]] == [0.25, 0.25, 0.5]
    assert [m["step"] for m in record["members"]] == [100, 200, None]
    meta = json.loads((tmp_path / "run" / "step-000000100" / "meta.json").read_text())
    assert record["members"][0]["sha256"] == meta["files"]["model.safetensors"]["sha256"]
    assert record["members"][0]["xxh3_128"] == meta["files"]["model.safetensors"]["xxh3_128"]
    # A file no run describes is identified by the xxh3-128 of the bytes read (no sha256 pass).
    assert record["members"][2]["xxh3_128"] == xxhash.xxh3_128_hexdigest(loose.read_bytes())
    assert record["members"][2]["sha256"] is None
    assert (record["dtype"], record["accumulate"], record["int_policy"]) == (
        "as members",
        "float32",
        "newest",
    )
    assert record["ladle_version"]


def test_the_provenance_inside_the_output_holds_the_checksums_of_the_bytes_read(tmp_path: Path) -> None:
    # The header is written before any checksum is known and rewritten in place at the end.
    a = _st(tmp_path / "a.safetensors", {"w": torch.randn(300, 7)})
    b = _st(tmp_path / "b.safetensors", {"w": torch.randn(300, 7)})
    out = tmp_path / "out.safetensors"
    average_to_file([a, b], out)
    with safe_open(str(out), "pt") as handle:
        inside = json.loads(handle.metadata()[PROVENANCE_KEY])
    assert [m["xxh3_128"] for m in inside["members"]] == [
        xxhash.xxh3_128_hexdigest(a.read_bytes()),
        xxhash.xxh3_128_hexdigest(b.read_bytes()),
    ]
    torch.testing.assert_close(
        load_file(str(out))["w"], (load_file(str(a))["w"] + load_file(str(b))["w"]) / 2
    )


def test_without_hashing_a_runs_checksum_is_recorded_as_recorded_not_as_read(tmp_path: Path) -> None:
    _run(tmp_path, [1.0, 3.0])
    result = average_to_file([tmp_path / "run"], tmp_path / "o.safetensors", hash_files=False)
    meta = json.loads((tmp_path / "run" / "step-000000100" / "meta.json").read_text())
    first = result.provenance["members"][0]
    assert first["sha256"] is None
    assert first["recorded_sha256"] == meta["files"]["model.safetensors"]["sha256"]


def test_a_sidecar_left_without_its_output_is_replaced(tmp_path: Path) -> None:
    # A writer killed between the sidecar and the output's rename leaves the sidecar alone.
    a = _st(tmp_path / "a.safetensors", {"w": torch.ones(2)})
    out = tmp_path / "o.safetensors"
    (tmp_path / "o.safetensors.json").write_text(json.dumps({"format": "ladle-soup/1", "members": []}))
    result = average_to_file([a], out)
    assert json.loads((tmp_path / "o.safetensors.json").read_text()) == result.provenance


def test_a_json_file_that_is_not_a_provenance_is_not_replaced_without_force(tmp_path: Path) -> None:
    a = _st(tmp_path / "a.safetensors", {"w": torch.ones(2)})
    (tmp_path / "notes.safetensors.json").write_text("{}")  # not ours, no output beside it
    with pytest.raises(OutputExists, match=r"notes\.safetensors\.json: already exists"):
        average_to_file([a], tmp_path / "notes.safetensors")


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_temporary_files_of_a_killed_writer_are_removed_by_the_next_write(tmp_path: Path) -> None:
    a = _st(tmp_path / "a.safetensors", {"w": torch.ones(2)})
    stale = tmp_path / f".o.safetensors.tmp-{_dead_pid()}-0a1b2c3d"
    stale.write_bytes(b"half an output")
    live = tmp_path / f".o.safetensors.tmp-{os.getpid()}-00000000"  # a writer still running
    live.write_bytes(b"in progress")
    other = tmp_path / f".other.safetensors.tmp-{_dead_pid()}-0a1b2c3d"  # another output's
    other.write_bytes(b"not ours")
    average_to_file([a], tmp_path / "o.safetensors")
    assert not stale.exists()
    assert live.exists() and other.exists()


def test_removing_stale_temporaries_names_what_it_removed(tmp_path: Path) -> None:
    stale = tmp_path / f".x.pt.tmp-{_dead_pid()}-ffff0000"
    stale.write_bytes(b"")
    assert remove_stale_temporaries(tmp_path / "x.pt") == [str(stale)]


def test_the_local_copy_of_a_killed_upload_is_removed_by_the_next_upload(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An output bound for a URL is written to a local staging folder first; a killed writer
    # cannot delete it, so the next upload on the machine does (a live writer's folder stays).
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    stale = tmp_path / "tmp" / f"ladle-output-{_dead_pid()}-abc"
    stale.mkdir()
    (stale / "o.safetensors").write_bytes(b"half an output")
    live = tmp_path / "tmp" / f"ladle-output-{os.getpid()}-def"
    live.mkdir()
    a = _st(tmp_path / "a.safetensors", {"w": torch.ones(2)})
    average_to_file([a], "memory://ladle-staging-test/o.safetensors")
    assert not stale.exists()
    assert live.exists()
    assert [p.name for p in (tmp_path / "tmp").iterdir()] == [live.name]


@pytest.mark.slow
def test_a_killed_average_leaves_no_output_and_its_temporary_is_cleaned_later(tmp_path: Path) -> None:
    # A real SIGKILL in the middle of writing: no output, no sidecar; the next run cleans up.
    files = [_st(tmp_path / f"c{i}.safetensors", {"w": torch.randn(2048, 1024)}) for i in range(3)]
    out = tmp_path / "o.safetensors"
    script = (
        "import os, signal, sys\n"
        "import ladle.formats.write as w\n"
        "original = w.SafetensorsWriter.write_block\n"
        "def write_block(self, *args, **kwargs):\n"
        "    original(self, *args, **kwargs)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "w.SafetensorsWriter.write_block = write_block\n"
        "import ladle\n"
        f"ladle.average_to_file({[str(f) for f in files]!r}, {str(out)!r})\n"
    )
    assert subprocess.run([sys.executable, "-c", script]).returncode == -9
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".o.safetensors.tmp-")]
    assert len(leftovers) == 1 and not out.exists() and not (tmp_path / "o.safetensors.json").exists()
    average_to_file(files, out)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".o.safetensors.tmp-")]
    assert read_provenance(out) is not None


def test_a_header_rewrite_that_does_not_fit_is_refused(tmp_path: Path) -> None:
    writer = SafetensorsWriter(
        str(tmp_path / "x.safetensors"), {"w": TensorInfo(torch.Size([1]), torch.float32)}
    )
    writer.write("w", torch.ones(1))
    with pytest.raises(RuntimeError, match="more header room than was reserved"):
        writer.finish(metadata={"big": "x" * 100})


def test_soup_files_carry_provenance_inside_and_beside(tmp_path: Path) -> None:
    _run(tmp_path, [1.0, 3.0])
    result = soup(tmp_path / "run", "last:2", output=tmp_path / "s.safetensors")
    assert read_provenance(tmp_path / "s.safetensors") == result.provenance
    assert json.loads((tmp_path / "s.safetensors.json").read_text()) == result.provenance
