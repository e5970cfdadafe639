"""Integrity on every read: meta.json is the record, sealed by its own checksum; the index never lies."""

from __future__ import annotations

import errno
import json
import logging
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import ladle
from ladle.errors import CorruptCheckpoint
from ladle.store.checkpoint import CheckpointInfo, load_meta
from ladle.store.history import HISTORY_LOG, HistoryLog, read_history
from ladle.store.layout import INDEX_NAME, META_NAME
from ladle.store.run import Run
from ladle.store.verification import verify_path


def commit(run: Run, step: int, loss: float) -> CheckpointInfo:
    pending = run.begin(f"step-{step:09d}")
    pending.write("model.safetensors", lambda p: save_file({"w": torch.full((3,), float(step))}, p))
    return pending.commit(step=step, metrics={"loss": loss}, monitor={"metric": "loss", "mode": "min"})


@pytest.fixture
def run(tmp_path: Path) -> Run:
    run = Run(tmp_path / "run", create=True).acquire()
    yield run
    run.release()


def tamper_index(run_path: str, old: str, new: str) -> None:
    """Change the index in place, keeping its length and its JSON valid."""
    assert len(old) == len(new)
    path = Path(run_path, INDEX_NAME)
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))
    json.loads(path.read_text())


def flip_byte(path: str | Path, offset: int, mask: int = 0x01) -> None:
    data = bytearray(Path(path).read_bytes())
    data[offset] ^= mask
    Path(path).write_bytes(bytes(data))


# -- the index is a cache, never the record ------------------------------------------------


def test_a_damaged_index_checksum_does_not_make_an_intact_checkpoint_bad(run: Run) -> None:
    info = commit(run, 1, 0.5)
    digest = info.files["model.safetensors"].sha256
    wrong = digest[:-1] + ("0" if digest[-1] != "0" else "1")
    tamper_index(run.path, digest, wrong)
    reader = Run(run.path)
    assert reader.get(1).files["model.safetensors"].sha256 == digest
    assert reader.verify() == []
    assert verify_path(run.path).ok


def test_a_resume_ignores_a_damaged_index(tmp_path: Path, model) -> None:
    with ladle.CheckpointManager(tmp_path / "run", model=model) as manager:
        info = manager.save(1)
    digest = info.files["model.safetensors"].sha256
    tamper_index(str(tmp_path / "run"), digest, digest[::-1])
    with ladle.CheckpointManager(tmp_path / "run", model=model) as manager:
        assert manager.resume().step == 1


def test_retention_keeps_the_true_best_whatever_the_index_claims(tmp_path: Path, model) -> None:
    keep = ladle.Keep(last=1, best=1)
    with ladle.CheckpointManager(tmp_path / "run", model=model, monitor="loss", keep=keep) as manager:
        manager.save(1, metrics={"loss": 0.1})
        manager.save(2, metrics={"loss": 0.5})
    # The index now claims step 2 is the best (0.0 < 0.1); its meta.json says 0.5.
    tamper_index(str(tmp_path / "run"), '"loss": 0.5', '"loss": 0.0')
    with ladle.CheckpointManager(tmp_path / "run", model=model, monitor="loss", keep=keep) as manager:
        manager.save(3, metrics={"loss": 0.9})
    kept = {c.step: c.metrics["loss"] for c in Run(tmp_path / "run").checkpoints()}
    assert kept == {1: 0.1, 3: 0.9}


def test_an_index_that_lists_a_checkpoint_without_a_marker_lists_nothing_extra(run: Run) -> None:
    commit(run, 1, 0.5)
    index = json.loads(Path(run.path, INDEX_NAME).read_text())
    fake = {**index["checkpoints"][0], "name": "step-000000009", "step": 9}
    index["checkpoints"].append(fake)
    Path(run.path, INDEX_NAME).write_text(json.dumps(index))
    assert [c.step for c in Run(run.path).checkpoints()] == [1]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    losses=st.lists(st.floats(0.0, 10.0), min_size=1, max_size=4),
    index=st.one_of(
        st.binary(max_size=64),
        st.recursive(
            st.none() | st.booleans() | st.floats(allow_nan=False) | st.text(max_size=8),
            lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children),
            max_leaves=12,
        ).map(lambda value: json.dumps(value).encode()),
    ),
    flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(1, 255)), max_size=3),
)
def test_whatever_the_index_holds_the_run_is_what_the_markers_say(
    tmp_path_factory: pytest.TempPathFactory, losses: list[float], index: bytes, flips: list[tuple[int, int]]
) -> None:
    run = Run(tmp_path_factory.mktemp("run"), create=True).acquire()
    for step, loss in enumerate(losses, start=1):
        commit(run, step, loss)
    truth = [(c.name, c.step, c.metrics, c.files) for c in Run(run.path).checkpoints()]
    best = Run(run.path).best().name
    real_index = bytearray(Path(run.path, INDEX_NAME).read_bytes())
    for offset, mask in flips:  # damage the real index, or replace it with anything at all
        real_index[offset % len(real_index)] ^= mask
    for damaged in (bytes(real_index), index):
        Path(run.path, INDEX_NAME).write_bytes(damaged)
        reader = Run(run.path)
        assert [(c.name, c.step, c.metrics, c.files) for c in reader.checkpoints()] == truth
        assert reader.best().name == best and reader.verify(load=False) == []
    run.release()


# -- meta.json is sealed by its own checksum ---------------------------------------------


def test_a_flipped_byte_in_meta_json_is_noticed_by_every_reader(run: Run) -> None:
    commit(run, 1, 0.5)
    info = commit(run, 2, 0.25)
    meta = Path(info.path, META_NAME)
    offset = meta.read_bytes().index(b"0.25") + 2  # 0.25 -> 0.35: valid JSON, another value
    flip_byte(meta, offset, 0x01)
    assert b"0.35" in meta.read_bytes()
    reader = Run(run.path)
    assert [c.step for c in reader.checkpoints()] == [1]  # ls, resume and retention see this
    result = verify_path(run.path)
    assert not result.ok
    assert any("meta_sha256" in p and "step-000000002" in p for p in result.problems)
    with pytest.raises(CorruptCheckpoint, match=r"step-000000002/meta.json: unreadable meta.json"):
        ladle.load_source(info.path)
    with pytest.raises(CorruptCheckpoint, match=r"meta.json"):
        ladle.inspect_checkpoint(info.path)


def test_a_resume_of_a_checkpoint_with_a_changed_meta_json_falls_back(tmp_path: Path, model) -> None:
    with ladle.CheckpointManager(tmp_path / "run", model=model) as manager:
        manager.save(1)
        second = manager.save(2)
    meta = Path(second.path, META_NAME)
    flip_byte(meta, meta.read_bytes().index(b'"step": 2') + 8, 0x01)  # step 2 -> 3
    with ladle.CheckpointManager(tmp_path / "run", model=model) as manager:
        assert manager.resume().step == 1


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_single_byte_change_of_a_sealed_meta_json_is_refused(run: Run, data: st.DataObject) -> None:
    info = run.checkpoints()[0] if len(run) else commit(run, 1, 0.5)
    raw = bytearray(info.meta_bytes())
    offset = data.draw(st.integers(0, len(raw) - 1))
    mask = data.draw(st.integers(1, 255))
    raw[offset] ^= mask
    with pytest.raises((ValueError, KeyError, TypeError)):
        load_meta(bytes(raw), info.path)


def test_a_meta_json_written_before_the_seal_still_loads(run: Run) -> None:
    info = commit(run, 1, 0.5)
    meta = Path(info.path, META_NAME)
    unsealed = json.loads(meta.read_bytes())
    del unsealed["meta_sha256"]
    meta.write_text(json.dumps(unsealed, indent=1))
    reader = Run(run.path)
    assert reader.get(1).metrics == {"loss": 0.5}
    assert reader.verify() == []


def test_file_names_that_leave_the_checkpoint_make_it_invalid(run: Run, tmp_path: Path) -> None:
    outside = tmp_path / "secret.bin"
    outside.write_bytes(b"not yours")
    info = commit(run, 1, 0.5)
    for name in ("../../secret.bin", str(outside), "sub/model.safetensors", ".hidden"):
        meta = json.loads(Path(info.path, META_NAME).read_bytes())
        meta.pop("meta_sha256", None)
        meta["files"] = {name: {"size": 9, "sha256": "0" * 64}}
        Path(info.path, META_NAME).write_text(json.dumps(meta, indent=1))
        assert len(Run(run.path)) == 0, name
        result = verify_path(run.path)
        assert any("not a plain name" in p for p in result.problems), name


# -- what changes during a read is not corruption -------------------------------------------


def test_a_checkpoint_deleted_while_verifying_is_not_reported_bad(run: Run) -> None:
    commit(run, 1, 0.5)
    doomed = commit(run, 2, 0.4)
    commit(run, 3, 0.3)

    def prune_meanwhile(name: str, done: int, total: int) -> None:
        if name == doomed.name:  # a writer's retention deletes it just before it is checked
            run.delete([doomed.name])

    result = verify_path(run.path, progress=prune_meanwhile)
    assert result.ok, result.problems
    assert any("deleted while it was being verified" in n for c in result.checkpoints for n in c.notes)


def test_a_checkpoint_committed_while_verifying_is_checked_like_the_others(run: Run) -> None:
    commit(run, 1, 0.5)

    def commit_meanwhile(name: str, done: int, total: int) -> None:
        if done == 0:
            commit(run, 2, 0.4)

    reader_view = Run(run.path)  # opened before the new commit
    assert len(reader_view) == 1
    result = verify_path(run.path, progress=commit_meanwhile)
    assert result.ok, result.problems


# -- the history log ------------------------------------------------------------------


def test_a_torn_last_history_line_does_not_swallow_the_next_resume_marker(tmp_path: Path, model) -> None:
    with ladle.CheckpointManager(tmp_path / "run", model=model, every_steps=1) as manager:
        for step in range(1, 6):
            manager.step(step, metrics={"loss": float(step)})
    log_path = tmp_path / "run" / HISTORY_LOG
    with open(log_path, "ab") as handle:  # a crash in the middle of appending step 6
        handle.write(b'{"kind": "step", "step": 6, "ep')
    with ladle.CheckpointManager(tmp_path / "run", model=model, every_steps=1) as manager:
        manager.resume()
        for step in range(6, 9):
            manager.step(step, metrics={"loss": float(step)})
    steps = [e["step"] for e in read_history(Run(tmp_path / "run"))]
    assert steps == [1, 2, 3, 4, 5, 6, 7, 8]


def test_a_history_log_that_is_a_link_is_never_appended_through(tmp_path: Path) -> None:
    run = Run(tmp_path / "run", create=True).acquire()
    target = tmp_path / "victim.txt"
    target.write_text("precious\n")
    Path(run.path, HISTORY_LOG).symlink_to(target)
    history = HistoryLog(run)
    with pytest.raises(ladle.RunError, match=r"history.jsonl: is a symbolic link"):
        history.append({"kind": "step", "step": 1, "metrics": {"loss": 1.0}})
    run.release()
    assert target.read_text() == "precious\n"


# -- a failed index rewrite after the commit ----------------------------------------------


def test_a_full_disk_while_rewriting_the_index_does_not_fail_a_committed_save(
    run: Run, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    commit(run, 1, 0.5)

    def disk_full() -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(run, "_write_index", disk_full)
    with caplog.at_level(logging.WARNING, logger="ladle"):
        info = commit(run, 2, 0.4)
    assert info.step == 2
    assert "could not rewrite ladle.json (No space left on device)" in caplog.text
    assert [c.step for c in Run(run.path).checkpoints()] == [1, 2]
    monkeypatch.undo()
    run.release()
    run.acquire()  # the next writer rewrites the index
    index = json.loads(Path(run.path, INDEX_NAME).read_text())
    assert [c["step"] for c in index["checkpoints"]] == [1, 2]


def test_index_temporary_files_left_by_a_killed_writer_are_removed(run: Run) -> None:
    commit(run, 1, 0.5)
    Path(run.path, f"{INDEX_NAME}.tmp-12345").write_text("{half")
    run.release()
    run.acquire()
    assert not list(Path(run.path).glob("*.tmp-*"))
