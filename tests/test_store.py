"""The run store: atomic commits, the index as a cache, listing only committed checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import ladle
from ladle.errors import ConfigError, NotARunDirectory, RunNotFound
from ladle.store.layout import INDEX_NAME
from ladle.store.run import Run


def commit(run: Run, step: int, metrics: dict | None = None, name: str | None = None) -> ladle.CheckpointInfo:
    pending = run.begin(name or f"step-{step:09d}")
    pending.write("model.safetensors", lambda p: save_file({"w": torch.full((3,), float(step))}, p))
    return pending.commit(
        step=step, epoch=0, metrics=metrics or {}, monitor={"metric": "loss", "mode": "min"}
    )


@pytest.fixture
def run(tmp_path: Path) -> Run:
    run = Run(tmp_path / "run", create=True).acquire()
    yield run
    run.release()


def test_a_commit_writes_files_meta_and_index(run: Run) -> None:
    info = commit(run, 10, {"loss": 0.5})
    meta = json.loads(Path(info.path, "meta.json").read_text())
    assert meta["step"] == 10 and meta["metrics"] == {"loss": 0.5}
    assert set(meta["files"]) == {"model.safetensors"}
    assert len(meta["files"]["model.safetensors"]["sha256"]) == 64
    index = json.loads(Path(run.path, INDEX_NAME).read_text())
    assert [c["name"] for c in index["checkpoints"]] == ["step-000000010"]
    assert index["latest"] == "step-000000010" and index["best"] == "step-000000010"


def test_a_reader_sees_the_same_checkpoints_without_a_lock(run: Run) -> None:
    commit(run, 1, {"loss": 2.0})
    commit(run, 2, {"loss": 1.0})
    reader = Run(run.path)
    assert [c.step for c in reader.checkpoints()] == [1, 2]
    assert reader.best().step == 2 and reader.latest().step == 2


def test_an_unfinished_save_is_invisible_and_cleaned_by_the_next_writer(run: Run) -> None:
    commit(run, 1)
    pending = run.begin("step-000000002")
    pending.write("model.safetensors", lambda p: save_file({"w": torch.zeros(2)}, p))
    run.release()  # the writer "dies" before commit
    assert [c.step for c in Run(run.path).checkpoints()] == [1]
    leftovers = [p.name for p in Path(run.path).iterdir() if p.name.startswith(".tmp-")]
    assert leftovers
    Run(run.path).acquire().release()
    assert not [p.name for p in Path(run.path).iterdir() if p.name.startswith(".tmp-")]


def test_a_missing_index_is_rebuilt_from_meta_files(run: Run) -> None:
    commit(run, 1, {"loss": 3.0})
    commit(run, 2, {"loss": 1.0})
    Path(run.path, INDEX_NAME).unlink()
    reader = Run(run.path)
    assert [c.step for c in reader.checkpoints()] == [1, 2]
    assert reader.best().step == 2


def test_a_stale_index_is_rebuilt(run: Run) -> None:
    commit(run, 1)
    stale = Path(run.path, INDEX_NAME).read_text()
    commit(run, 2)
    Path(run.path, INDEX_NAME).write_text(stale)
    assert [c.step for c in Run(run.path).checkpoints()] == [1, 2]


def test_a_checkpoint_with_invalid_meta_is_never_listed(run: Run) -> None:
    commit(run, 1)
    info = commit(run, 2)
    Path(info.path, "meta.json").write_text("{ truncated")
    assert [c.step for c in Run(run.path).checkpoints()] == [1]


def test_a_directory_without_meta_is_not_a_checkpoint(run: Run) -> None:
    commit(run, 1)
    Path(run.path, "step-000000005").mkdir()
    assert [c.step for c in Run(run.path).checkpoints()] == [1]


def test_best_ignores_non_finite_metrics(run: Run) -> None:
    commit(run, 1, {"loss": 2.0})
    commit(run, 2, {"loss": float("nan")})
    commit(run, 3, {"loss": float("-inf")})
    assert run.best().step == 1


def test_get_accepts_name_step_latest_best_and_path(run: Run) -> None:
    first = commit(run, 1, {"loss": 1.0})
    commit(run, 2, {"loss": 2.0})
    assert run.get("step-000000001") == first
    assert run.get(1) == first
    assert run.get("1") == first
    assert run.get("best") == first
    assert run.get("latest").step == 2
    assert run.get(first.path) == first


def test_an_unknown_checkpoint_is_a_one_line_error_listing_what_exists(run: Run) -> None:
    commit(run, 1)
    with pytest.raises(ladle.CheckpointNotFound, match=r"no checkpoint 'step-9'; available: step-000000001"):
        run.get("step-9")


def test_a_run_directory_that_is_a_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "run"
    path.write_text("not a directory")
    with pytest.raises(NotARunDirectory, match=r"run: is a file, not a run directory"):
        Run(path)


def test_a_missing_run_is_an_error_unless_created(tmp_path: Path) -> None:
    with pytest.raises(RunNotFound, match="no such run directory"):
        Run(tmp_path / "nope")
    assert len(Run(tmp_path / "nope", create=True)) == 0


def test_verify_names_a_corrupted_and_a_truncated_file(run: Run) -> None:
    good = commit(run, 1)
    bad = commit(run, 2)
    truncated = commit(run, 3)
    data = bytearray(Path(bad.file("model.safetensors")).read_bytes())
    data[-1] ^= 0xFF
    Path(bad.file("model.safetensors")).write_bytes(bytes(data))
    with open(truncated.file("model.safetensors"), "r+b") as handle:
        handle.truncate(10)
    problems = run.verify()
    assert len(problems) == 2
    assert "step-000000002/model.safetensors: xxh3_128" in problems[0]
    assert "step-000000003/model.safetensors: size 10 bytes" in problems[1]
    assert run.verify(good.name) == []


def test_checkpoint_names_are_validated(run: Run) -> None:
    with pytest.raises(ConfigError, match="not allowed"):
        run.begin("../escape")
    commit(run, 1)
    with pytest.raises(ConfigError, match="already exists"):
        run.begin("step-000000001")


def test_delete_removes_checkpoints_and_updates_the_index(run: Run) -> None:
    commit(run, 1)
    commit(run, 2)
    run.delete(["step-000000001"])
    assert [c.step for c in Run(run.path).checkpoints()] == [2]
    assert not Path(run.path, "step-000000001").exists()


def test_pinning_survives_an_index_rebuild(run: Run) -> None:
    commit(run, 1)
    run.set_pinned("step-000000001")
    Path(run.path, INDEX_NAME).unlink()
    assert Run(run.path).get(1).pinned


def test_writing_needs_the_lock(tmp_path: Path) -> None:
    run = Run(tmp_path / "run", create=True)
    with pytest.raises(ladle.LadleError, match="read-only; call acquire"):
        run.begin("x")


def test_runs_on_an_fsspec_memory_filesystem() -> None:
    run = Run("memory://ladle-test/run", create=True).acquire()
    commit(run, 1, {"loss": 1.0})
    run.release()
    reader = Run("memory://ladle-test/run")
    assert [c.step for c in reader.checkpoints()] == [1]
    assert reader.verify(load=False) == []


def test_adopting_a_directory_written_in_place_commits_it(run: Run) -> None:
    folder = Path(run.path, "checkpoint-40")
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"weights")
    (folder / "trainer_state.json").write_text("{}")
    info = run.adopt("checkpoint-40", step=40, metrics={"eval_loss": 0.3})
    assert set(info.files) == {"model.safetensors", "trainer_state.json"}
    assert Run(run.path).get(40).metrics == {"eval_loss": 0.3}
    assert run.verify(info.name, load=False) == []


def test_adopting_again_replaces_the_record(run: Run) -> None:
    folder = Path(run.path, "checkpoint-40")
    folder.mkdir()
    (folder / "a.bin").write_bytes(b"1")
    run.adopt("checkpoint-40", step=40)
    (folder / "a.bin").write_bytes(b"22")
    again = run.adopt("checkpoint-40", step=40)
    assert again.files["a.bin"].size == 2 and len(Run(run.path)) == 1


FULL_DISK_SCRIPT = """
import json, resource, signal, sys, torch, ladle
from torch import nn
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead
hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
found = []
with ladle.CheckpointManager(sys.argv[1], model=nn.Linear(256, 256)) as manager:
    manager.save(1)
    for step, limit in ((2, 2000), (3, 100_000)):  # state.pt (torch.save) fails, then model.safetensors
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
        try:
            manager.save(step)
        except ladle.WriteFailed as exc:
            found.append([str(exc), type(exc.__cause__).__name__, isinstance(exc, OSError)])
        resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))
print(json.dumps(found))
"""


@pytest.mark.slow
def test_a_save_that_cannot_write_names_the_run_the_file_and_the_cause(tmp_path: Path) -> None:
    import subprocess
    import sys

    run_dir = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-c", FULL_DISK_SCRIPT, str(run_dir)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    (torch_message, torch_cause, _), (st_message, st_cause, is_os_error) = json.loads(result.stdout)
    assert torch_message.startswith(f"run {run_dir}: cannot write {run_dir}/step-000000002/state.pt (")
    assert torch_cause == "RuntimeError"
    assert st_message.startswith(
        f"run {run_dir}: cannot write {run_dir}/step-000000003/model.safetensors (file too large); "
    )
    assert st_cause == "SafetensorError" and is_os_error
    assert "\n" not in torch_message + st_message
    run = Run(run_dir)
    assert [c.step for c in run.checkpoints()] == [1] and run.verify() == []
    assert not [p.name for p in run_dir.iterdir() if p.name.startswith(".tmp-")]
