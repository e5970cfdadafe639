"""One behaviour suite for every place a run can live: a local path, `file://`, `memory://`
and `s3://` on a real S3 server (moto on 127.0.0.1, see tests/s3_server.py).

Each test takes `where` (the base URL of a fresh, empty location) and runs the same
steps on all four; only what differs by nature (a `memory://` store lives inside one
process, so a killed subprocess cannot use it) is special-cased.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import fsspec
import pytest
import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import load_file, save_file

import ladle
from ladle.averaging.provenance import PROVENANCE_FORMAT
from ladle.cli.main import main as cli
from ladle.formats.write import atomic_path, output_location
from ladle.store.foreign_runs import ForeignRun
from ladle.store.fsspec_storage import FsspecStorage
from ladle.store.history import read_history
from ladle.store.lock import LEASE_PREFIX
from tests.conftest import SCRIPTS, tiny_model

# The real S3 server costs a few seconds per test (a bucket, a botocore session): the fast runs
# (`-m "not slow"`, the other Pythons in `make test`) cover the same behaviour on memory://.
S3 = pytest.param("s3", marks=pytest.mark.slow)
KINDS = ["local", "file", "memory", S3]


@pytest.fixture(params=KINDS)
def where(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The base location (path or URL) of an empty place to put runs."""
    yield from _location(request, tmp_path)


@pytest.fixture(params=["memory", S3])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """Like `where`, on object stores only (their lock is a lease; a local one is an flock)."""
    yield from _location(request, tmp_path)


def _location(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    kind = request.param
    if kind == "local":
        yield str(tmp_path / "store")
    elif kind == "file":
        yield f"file://{tmp_path}/store"
    elif kind == "memory":
        base = f"memory://ladle-{secrets.token_hex(6)}"
        yield base
        fs = fsspec.filesystem("memory")
        if fs.exists(base):
            fs.rm(base, recursive=True)
    else:
        yield request.getfixturevalue("s3_bucket")


def is_memory(where: str) -> bool:
    return where.startswith("memory://")


def listing(url: str) -> list[str]:
    """Every file under `url`, relative to it, sorted (what a user would see in the store)."""
    if "://" not in url or url.startswith("file://"):
        root = url.removeprefix("file://")
        return sorted(
            os.path.relpath(os.path.join(d, f), root) for d, _, files in os.walk(root) for f in files
        )
    fs, path = fsspec.core.url_to_fs(url)
    fs.invalidate_cache()
    return sorted(p[len(path) + 1 :] for p in fs.find(path))


def train_tiny() -> object:
    spec = importlib.util.spec_from_file_location("train_tiny", SCRIPTS / "train_tiny.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def outcome(path: Path) -> dict:
    return torch.load(path, weights_only=True)


# -- the plain loop ------------------------------------------------------------------


def test_the_plain_loop_starts_on_a_new_prefix_and_resumes_bit_exactly(where: str, tmp_path: Path) -> None:
    script = train_tiny()
    assert script.main([f"{where}/straight", str(tmp_path / "straight.pt"), "--total", "12"]) == 0
    assert (
        script.main([f"{where}/runs/exp1", str(tmp_path / "resumed.pt"), "--total", "12", "--stop-at", "5"])
        == 0
    )
    assert not (tmp_path / "resumed.pt").exists()
    assert script.main([f"{where}/runs/exp1", str(tmp_path / "resumed.pt"), "--total", "12"]) == 0

    straight, resumed = outcome(tmp_path / "straight.pt"), outcome(tmp_path / "resumed.pt")
    assert torch.equal(straight["losses"], resumed["losses"])
    for key, value in straight["params"].items():
        assert torch.equal(value, resumed["params"][key]), key
    run = ladle.Run(f"{where}/runs/exp1")
    assert run.latest() is not None and run.verify() == []
    assert [e["step"] for e in read_history(run)] == list(range(1, 13))


def test_a_missing_run_is_reported_not_created(where: str) -> None:
    with pytest.raises(ladle.RunNotFound, match="no such run"):
        ladle.Run(f"{where}/never/made")


def test_saves_leave_only_committed_checkpoints_and_the_run_files(where: str, model: torch.nn.Module) -> None:
    run_url = f"{where}/runs/exp1"
    with ladle.CheckpointManager(run_url, model=model, every_steps=1) as manager:
        for step in (1, 2):
            manager.step(step, metrics={"loss": 1.0 / step})
    files = listing(run_url)
    for name in ("step-000000001", "step-000000002"):
        assert f"{name}/meta.json" in files and f"{name}/model.safetensors" in files
    assert not [f for f in files if f.startswith((".tmp-", ".saving-", ".deleting-", LEASE_PREFIX))], files


def test_the_history_on_a_store_grows_by_parts_and_is_never_rewritten(
    store: str, model: torch.nn.Module
) -> None:
    run_url = f"{store}/runs/exp1"
    fs, path = fsspec.core.url_to_fs(run_url)
    with ladle.CheckpointManager(run_url, model=model, every_steps=1) as manager:
        manager.step(1, metrics={"loss": 1.0})
        first = fs.cat_file(f"{path}/history.parts/000000001.jsonl")
        manager.step(2, metrics={"loss": 0.5})
        manager.step(3, metrics={"loss": 0.25})
    parts = [f for f in listing(run_url) if f.startswith("history.parts/")]
    assert len(parts) == 3 and "history.jsonl" not in listing(run_url)
    assert fs.cat_file(f"{path}/history.parts/000000001.jsonl") == first
    assert [e["metrics"]["loss"] for e in read_history(ladle.Run(run_url))] == [1.0, 0.5, 0.25]


# -- retention -------------------------------------------------------------------------


def test_retention_deletes_whole_checkpoints_from_the_store(where: str, model: torch.nn.Module) -> None:
    run_url = f"{where}/runs/exp1"
    with ladle.CheckpointManager(run_url, model=model, every_steps=1, keep=ladle.Keep(last=2)) as manager:
        for step in range(1, 6):
            manager.step(step, metrics={"loss": 1.0})
    run = ladle.Run(run_url)
    assert [c.name for c in run] == ["step-000000004", "step-000000005"]
    checkpoint_dirs = {f.split("/")[0] for f in listing(run_url) if f.startswith("step-")}
    assert checkpoint_dirs == {"step-000000004", "step-000000005"}


# -- writers ---------------------------------------------------------------------------


def test_a_second_writer_is_refused_with_the_holder_named(where: str, model: torch.nn.Module) -> None:
    run_url = f"{where}/runs/exp1"
    with ladle.CheckpointManager(run_url, model=model):
        with pytest.raises(ladle.RunLocked, match=rf"pid {os.getpid()} on host"):
            ladle.CheckpointManager(run_url, model=model)
    # Released on close: the next writer gets the run.
    with ladle.CheckpointManager(run_url, model=model) as manager:
        manager.save(step=1)
    assert [c.step for c in ladle.Run(run_url)] == [1]


def test_a_lock_whose_lease_expired_is_taken_over(store: str, model: torch.nn.Module) -> None:
    run_url = f"{store}/runs/exp1"
    ladle.Run(run_url, create=True)
    stale = {"pid": 1, "host": "elsewhere", "time": 0.0, "renewed": 0.0, "lease_s": 60.0, "token": "x"}
    fs, path = fsspec.core.url_to_fs(run_url)
    fs.pipe_file(f"{path}/{LEASE_PREFIX}000000001", json.dumps(stale).encode())
    with ladle.CheckpointManager(run_url, model=model) as manager:
        manager.save(step=1)
    assert [c.step for c in ladle.Run(run_url)] == [1]
    assert not [f for f in listing(run_url) if f.startswith(LEASE_PREFIX)]


def test_a_writer_whose_lock_was_taken_over_commits_nothing(store: str, model: torch.nn.Module) -> None:
    run_url = f"{store}/runs/exp1"
    run = ladle.Run(run_url, create=True).acquire()
    fs, path = fsspec.core.url_to_fs(run_url)
    newer = {"pid": 1, "host": "elsewhere", "time": 0.0, "renewed": 1e12, "lease_s": 60.0, "token": "y"}
    fs.pipe_file(f"{path}/{LEASE_PREFIX}000000099", json.dumps(newer).encode())
    pending = run.begin("step-000000001")
    pending.write("model.safetensors", lambda p: save_file(model.state_dict(), p))
    with pytest.raises(ladle.RunLocked, match="taken over by pid 1 on host elsewhere"):
        pending.commit(step=1)
    assert len(ladle.Run(run_url)) == 0
    assert not [f for f in listing(run_url) if f.startswith("step-")]


# -- crashes ---------------------------------------------------------------------------

KILLED_WRITER = textwrap.dedent(
    """
    import sys, time
    import torch
    from safetensors.torch import save_file
    import ladle

    run = ladle.Run(sys.argv[1], create=True).acquire()
    pending = run.begin("step-000000002")
    pending.write("model.safetensors", lambda p: save_file({"w": torch.ones(64)}, p))
    print("written", flush=True)
    time.sleep(120)
    """
)


def test_a_writer_killed_mid_save_leaves_nothing_listed_and_the_next_writer_cleans_up(
    where: str, model: torch.nn.Module
) -> None:
    run_url = f"{where}/runs/exp1"
    with ladle.CheckpointManager(run_url, model=model) as manager:
        manager.save(step=1)
    committed = set(listing(run_url))
    if is_memory(where):
        # A memory:// store lives in this process: abandon a save half-way, and make its lock
        # look like a dead process's (as a kill would leave it on a store).
        run = ladle.Run(run_url).acquire()
        run.begin("step-000000002").write("model.safetensors", lambda p: save_file({"w": torch.ones(64)}, p))
        for path in [f for f in listing(run_url) if f.startswith(LEASE_PREFIX)]:
            stale = {"pid": 1, "host": "elsewhere", "renewed": 0.0, "lease_s": 60.0}
            fsspec.filesystem("memory").pipe_file(f"{run_url}/{path}", json.dumps(stale).encode())
    else:
        child = subprocess.Popen(
            [sys.executable, "-c", KILLED_WRITER, run_url], stdout=subprocess.PIPE, text=True, env=os.environ
        )
        try:
            assert child.stdout is not None and child.stdout.readline().strip() == "written"
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait(timeout=30)
            assert child.stdout is not None
            child.stdout.close()
    leftovers = set(listing(run_url)) - committed
    assert leftovers, "the killed save left nothing to clean up; the test did not kill mid-save"
    assert [c.step for c in ladle.Run(run_url)] == [1]

    with ladle.CheckpointManager(run_url, model=model) as manager:
        assert [c.step for c in manager.run] == [1]
        manager.save(step=2)
    assert [c.step for c in ladle.Run(run_url)] == [1, 2]
    files = listing(run_url)
    assert not [f for f in files if f.startswith((".tmp-", ".saving-", LEASE_PREFIX))], files


def test_a_failed_save_leaves_no_checkpoint(where: str, model: torch.nn.Module) -> None:
    run_url = f"{where}/runs/exp1"
    run = ladle.Run(run_url, create=True).acquire()
    pending = run.begin("step-000000001")
    pending.write("model.safetensors", lambda p: save_file(model.state_dict(), p))

    def broken(path: str) -> None:
        raise RuntimeError("writer failed")

    with pytest.raises(RuntimeError, match="writer failed"):
        pending.write("state.pt", broken)
    pending.abort()
    run.release()
    assert len(ladle.Run(run_url)) == 0
    assert not [f for f in listing(run_url) if f.startswith(("step-", ".saving-"))]


def test_user_files_beside_the_run_are_never_cleaned(where: str, model: torch.nn.Module) -> None:
    run_url = f"{where}/runs/exp1"
    ladle.Run(run_url, create=True)
    with fsspec.open(f"{run_url}/notes/readme.txt", "wb", auto_mkdir=True) as handle:
        handle.write(b"mine")
    with ladle.CheckpointManager(run_url, model=model) as manager:
        manager.save(step=1)
    assert "notes/readme.txt" in listing(run_url)


# -- commands on URLs ------------------------------------------------------------------


@pytest.fixture
def trained(where: str, model: torch.nn.Module) -> str:
    """A run with three checkpoints (val_loss 3, 1, 2) at `<where>/runs/exp1`."""
    run_url = f"{where}/runs/exp1"
    with ladle.CheckpointManager(run_url, model=model, monitor="val_loss", mode="min") as manager:
        for epoch, val in enumerate((3.0, 1.0, 2.0)):
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(0.1)
            manager.epoch_end(epoch, step=10 * (epoch + 1), metrics={"val_loss": val})
    return run_url


def test_ls_and_verify_read_runs_on_urls(trained: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(["ls", trained]) == 0
    assert "step-000000020" in capsys.readouterr().out
    assert cli(["verify", trained]) == 0


def test_inspect_reads_a_checkpoint_on_a_url(trained: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(["inspect", f"{trained}/step-000000020"]) == 0
    out = capsys.readouterr().out
    assert "0.weight" in out


def test_avg_averages_checkpoints_on_a_url(trained: str, tmp_path: Path, model: torch.nn.Module) -> None:
    out = tmp_path / "avg.safetensors"
    members = [f"{trained}/step-0000000{n}0" for n in (1, 2, 3)]
    assert cli(["avg", *members, "-o", str(out)]) == 0
    expected = {
        key: torch.stack([ladle.load_source(m).tensor(key) for m in members]).mean(0)
        for key in model.state_dict()
    }
    averaged = load_file(out)
    for key, value in expected.items():
        torch.testing.assert_close(averaged[key], value)


def test_soup_of_a_run_on_a_url(trained: str, tmp_path: Path) -> None:
    out = tmp_path / "soup.safetensors"
    assert cli(["soup", trained, "--recipe", "top:2", "-o", str(out)]) == 0
    assert out.exists()
    result = ladle.soup(trained, "top:2", output=str(tmp_path / "soup2.safetensors"))
    assert sorted(m.step for m in result.members) == [20, 30]


def test_diff_compares_checkpoints_on_urls(trained: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(["diff", f"{trained}/step-000000010", f"{trained}/step-000000020"]) == 1  # they differ
    assert "0.weight" in capsys.readouterr().out
    assert cli(["diff", f"{trained}/step-000000010", f"{trained}/step-000000010"]) == 0


def test_export_reads_a_checkpoint_on_a_url(trained: str, tmp_path: Path) -> None:
    out = tmp_path / "weights.safetensors"
    assert cli(["export", f"{trained}/best", "-o", str(out)]) == 0
    expected = ladle.load_source(f"{trained}/step-000000020").state_dict()
    exported = load_file(out)
    assert exported.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(exported[key], value), key


def test_report_draws_a_run_on_a_url(trained: str, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    out = tmp_path / "report.png"
    assert cli(["report", trained, "-o", str(out)]) == 0
    assert out.stat().st_size > 0


def test_a_sharded_run_on_a_store_is_refused_before_anything_is_written(store: str) -> None:
    # DCP writes every rank's files into a folder that is committed by renaming it: stores have
    # no rename. It used to fail at the first save ("... has no attribute 'tmp_path'").
    with pytest.raises(ladle.ConfigError, match="object store") as raised:
        ladle.CheckpointManager(f"{store}/runs/sharded", model=torch.nn.Linear(2, 2), sharded=True)
    assert str(raised.value).startswith(f"{store}/runs/sharded: ")
    assert listing(store) == []


# -- other tools' output folders where they live --------------------------------------------


def put(url: str, data: bytes) -> None:
    """Write a file at a path or URL, as the training tool would have."""
    if "://" not in url or url.startswith("file://"):
        path = Path(url.removeprefix("file://"))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return
    with fsspec.open(url, "wb") as handle:
        handle.write(data)


def safetensors_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    from safetensors.torch import save

    return save(tensors)


@pytest.fixture
def trainer_output(where: str) -> str:
    """A transformers Trainer output_dir at `<where>/hf-out`: checkpoint-10, -20 and -30 whose
    weights are all 10, 20, 30 and whose eval_loss is best at step 20; beside them the final
    model save_model() writes, which is not a checkpoint."""
    root = f"{where}/hf-out"
    for step in (10, 20, 30):
        folder = f"{root}/checkpoint-{step}"
        put(f"{folder}/model.safetensors", safetensors_bytes({"w": torch.full((4,), float(step))}))
        history = [{"step": step, "loss": 0.5}, {"step": step, "eval_loss": abs(step - 20) + 1.0}]
        put(
            f"{folder}/trainer_state.json",
            json.dumps({"global_step": step, "epoch": step / 10, "log_history": history}).encode(),
        )
        put(f"{folder}/config.json", b'{"model_type": "tiny"}')
        put(f"{folder}/optimizer.pt", b"training state, not for the soup")
    put(f"{root}/model.safetensors", safetensors_bytes({"w": torch.full((4,), 99.0)}))
    return root


def test_a_trainer_output_folder_is_listed_with_its_metrics_where_it_lives(
    trainer_output: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli(["ls", trainer_output, "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert listed["tool"] == "transformers"
    assert [(c["step"], c["metrics"]["eval_loss"]) for c in listed["checkpoints"]] == [
        (10, 11.0),
        (20, 1.0),
        (30, 11.0),
    ]


def test_a_soup_of_a_trainer_output_folder_is_a_from_pretrained_folder(
    trainer_output: str, tmp_path: Path
) -> None:
    out = tmp_path / "soup"
    assert cli(["soup", trainer_output, "--recipe", "top:2:eval_loss:min", "-o", str(out)]) == 0
    assert load_file(out / "model.safetensors")["w"].tolist() == [15.0] * 4  # steps 10 and 20 (tie: older)
    assert (out / "config.json").read_bytes() == b'{"model_type": "tiny"}'
    assert not (out / "optimizer.pt").exists()


def test_avg_of_a_trainer_output_folder_takes_its_checkpoints_not_the_final_model(
    trainer_output: str, tmp_path: Path
) -> None:
    out = tmp_path / "avg.safetensors"
    assert cli(["avg", trainer_output, "-o", str(out)]) == 0
    assert load_file(out)["w"].tolist() == [20.0] * 4


def test_verify_checks_that_a_trainer_output_folders_weights_parse(
    trainer_output: str, capsys: pytest.CaptureFixture[str]
) -> None:
    put(f"{trainer_output}/checkpoint-30/model.safetensors", b"not safetensors")
    assert cli(["verify", trainer_output]) == 1
    out = capsys.readouterr().out
    assert "checkpoint-10" in out and "checkpoint-30" in out and "no checksums" in out


def test_a_timm_output_folder_is_souped_with_its_summary_metrics_where_it_lives(
    where: str, tmp_path: Path
) -> None:
    root = f"{where}/timm-out"
    for epoch in (1, 2, 3):
        buffer = io.BytesIO()
        torch.save({"state_dict": {"w": torch.full((2,), float(epoch))}, "epoch": epoch}, buffer)
        put(f"{root}/checkpoint-{epoch}.pth.tar", buffer.getvalue())
    put(f"{root}/summary.csv", b"epoch,train_loss,eval_top1\n1,0.9,70\n2,0.8,80\n3,0.7,75\n")
    result = ladle.soup(root, "top:2:eval_top1:max", output=str(tmp_path / "soup.safetensors"))
    assert [m.step for m in result.members] == [2, 3]
    assert load_file(tmp_path / "soup.safetensors")["w"].tolist() == [2.5, 2.5]


def test_inspecting_a_timm_output_folder_names_its_newest_checkpoint(
    where: str, capsys: pytest.CaptureFixture[str]
) -> None:
    for epoch in (1, 2):
        buffer = io.BytesIO()
        torch.save({"state_dict": {"w": torch.ones(2)}, "epoch": epoch}, buffer)
        put(f"{where}/timm-out/checkpoint-{epoch}.pth.tar", buffer.getvalue())
    assert cli(["inspect", f"{where}/timm-out"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "a timm output folder" in err and "/timm-out/checkpoint-2.pth.tar (`ladle ls" in err


MONITOR_KEY = "ModelCheckpoint{'monitor': 'val_loss', 'mode': 'min', 'every_n_train_steps': 0}"


def lightning_ckpt(step: int, score: float, size: int = 4) -> bytes:
    """A Lightning `.ckpt` as ModelCheckpoint saves it: weights all `step`, the monitored score."""
    buffer = io.BytesIO()
    callback = {"monitor": "val_loss", "current_score": torch.tensor(score), "dirpath": "elsewhere"}
    state = {"state_dict": {"w": torch.full((size,), float(step))}, "global_step": step, "epoch": step // 10}
    torch.save({**state, "callbacks": {MONITOR_KEY: callback}}, buffer)
    return buffer.getvalue()


def test_a_lightning_folder_is_listed_and_souped_where_it_lives(
    where: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = f"{where}/lightning"
    for step, score in ((10, 0.5), (20, 0.25), (30, 0.375)):
        put(f"{root}/checkpoints/epoch={step // 10 - 1}-step={step}.ckpt", lightning_ckpt(step, score))
    put(f"{root}/checkpoints/last.ckpt", lightning_ckpt(30, 0.375))  # a copy of the newest
    put(f"{root}/hparams.yaml", b"lr: 0.1\n")
    assert cli(["ls", root, "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert listed["tool"] == "lightning" and listed["monitor"] == {"metric": "val_loss", "mode": "min"}
    assert [(c["step"], c["metrics"]["val_loss"]) for c in listed["checkpoints"]] == [
        (10, 0.5),
        (20, 0.25),
        (30, 0.375),
    ]
    result = ladle.soup(root, "top:2", output=str(tmp_path / "soup.safetensors"))  # the monitor's own mode
    assert [m.step for m in result.members] == [20, 30]
    assert load_file(tmp_path / "soup.safetensors")["w"].tolist() == [25.0] * 4


def test_listing_a_lightning_folder_on_a_store_reads_a_small_part_of_each_file(
    store: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ladle.store import ranged

    fetched: list[int] = []
    fetch = ranged.FsspecRangedFile._fetch_range

    def counted(self: ranged.FsspecRangedFile, start: int, end: int) -> bytes:
        fetched.append(end - start)
        return fetch(self, start, end)

    monkeypatch.setattr(ranged.FsspecRangedFile, "_fetch_range", counted)
    size = 1 << 20  # 4 MiB of weights per checkpoint
    for step, score in ((10, 0.5), (20, 0.25)):
        put(f"{store}/big/epoch={step // 10 - 1}-step={step}.ckpt", lightning_ckpt(step, score, size))
    run = ForeignRun(f"{store}/big")
    assert [(c.step, c.metrics["val_loss"]) for c in run.checkpoints()] == [(10, 0.5), (20, 0.25)]
    assert sum(fetched) < 2 * 256 * 1024  # of 8 MiB


def test_a_dcp_folder_on_a_store_is_refused_with_one_line(
    store: str, capsys: pytest.CaptureFixture[str]
) -> None:
    put(f"{store}/dcp/step-100/.metadata", b"DCP metadata")
    put(f"{store}/dcp/step-100/__0_0.distcp", b"shard")
    assert cli(["ls", f"{store}/dcp"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "a dcp output folder on a store" in err and "local disk" in err


@pytest.mark.parametrize(
    "command", [["ls"], ["soup", "--recipe", "last:1", "-o", "OUT.safetensors"], ["report", "-o", "OUT.png"]]
)
def test_a_folder_that_is_not_a_run_is_refused_wherever_it_lives(
    where: str, command: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Opened as a run, it read as one with no checkpoints ("selects none of the 0 checkpoints").
    put(f"{where}/notes/readme.txt", b"not a run")
    argv = [command[0], f"{where}/notes", *(a.replace("OUT", str(tmp_path / "out")) for a in command[1:])]
    assert cli(argv) == 2
    err = capsys.readouterr().err
    assert "not a ladle run" in err and len(err.strip().splitlines()) == 1
    assert not list(tmp_path.glob("out*"))


# -- outputs to URLs ----------------------------------------------------------------------


def read_bytes(url: str) -> bytes:
    with fsspec.open(url, "rb") as handle:
        return bytes(handle.read())


def exists(url: str) -> bool:
    fs, path = fsspec.core.url_to_fs(url)
    fs.invalidate_cache()
    return bool(fs.exists(path))


@pytest.fixture
def scratch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[[], Path]:
    """Call it to send this process's temporary files to an empty folder, which it returns."""

    def redirect() -> Path:
        folder = tmp_path / "tmp"
        folder.mkdir()
        monkeypatch.setenv("TMPDIR", str(folder))
        monkeypatch.setattr(tempfile, "tempdir", None)
        return folder

    return redirect


def test_avg_writes_its_output_and_provenance_to_a_url_and_stages_nothing_behind(
    trained: str, where: str, model: torch.nn.Module, scratch: Callable[[], Path]
) -> None:
    members = [f"{trained}/step-0000000{n}0" for n in (1, 2, 3)]
    out = f"{where}/runs/avg.safetensors"
    staging = scratch()
    assert cli(["avg", *members, "-o", out]) == 0
    averaged = safetensors_load(read_bytes(out))
    for key in model.state_dict():
        expected = torch.stack([ladle.load_source(m).tensor(key) for m in members]).mean(0)
        torch.testing.assert_close(averaged[key], expected)
    sidecar = json.loads(read_bytes(f"{out}.json"))
    assert sidecar["format"] == PROVENANCE_FORMAT and len(sidecar["members"]) == 3
    assert ladle.read_provenance(out) == sidecar
    assert list(staging.iterdir()) == []


def test_an_output_on_a_url_is_replaced_only_with_force(
    trained: str, where: str, capsys: pytest.CaptureFixture[str]
) -> None:
    members = [f"{trained}/step-000000010", f"{trained}/step-000000020"]
    out = f"{where}/runs/avg.safetensors"
    assert cli(["avg", *members, "-o", out]) == 0
    first = read_bytes(out)
    capsys.readouterr()
    assert cli(["avg", f"{trained}/step-000000030", members[0], "-o", out]) == 2
    err = capsys.readouterr().err
    assert "already exists" in err and "--force" in err and out.removeprefix("file://") in err
    assert read_bytes(out) == first
    assert cli(["avg", f"{trained}/step-000000030", members[0], "-o", out, "--force"]) == 0
    assert read_bytes(out) != first
    with pytest.raises(ladle.OutputExists, match="already exists"):
        ladle.average_to_file(members, out)


def test_a_failed_average_to_a_url_writes_nothing_there_nor_in_the_temporary_folder(
    trained: str, where: str, scratch: Callable[[], Path]
) -> None:
    member = f"{trained}/step-000000010"
    with fsspec.open(f"{member}/model.safetensors", "rb") as handle:
        data = bytearray(handle.read())
    data[-1] ^= 0xFF  # the checksum its run recorded no longer matches
    with fsspec.open(f"{member}/model.safetensors", "wb") as handle:
        handle.write(bytes(data))
    out = f"{where}/runs/avg.safetensors"
    staging = scratch()
    with pytest.raises(ladle.CorruptCheckpoint, match="step-000000010"):
        ladle.average_to_file([member, f"{trained}/step-000000020"], out)
    assert not exists(out) and not exists(f"{out}.json")
    assert list(staging.iterdir()) == []


def test_the_provenance_is_uploaded_before_the_output_and_a_left_one_is_replaced(
    store: str, tmp_path: Path, model: torch.nn.Module, monkeypatch: pytest.MonkeyPatch
) -> None:
    member = tmp_path / "member.safetensors"
    save_file(model.state_dict(), member)
    out = f"{store}/outputs/avg.safetensors"
    uploaded: list[str] = []
    real_upload = FsspecStorage.upload

    def upload(self: FsspecStorage, local: str, path: str, *, exclusive: bool = False) -> None:
        uploaded.append(path.rsplit("/", 1)[-1])
        if path.endswith(".safetensors"):
            raise ladle.StorageError(f"{path}: cannot reach the store (test)")
        real_upload(self, local, path, exclusive=exclusive)

    monkeypatch.setattr(FsspecStorage, "upload", upload)
    with pytest.raises(ladle.StorageError, match="cannot reach the store"):
        ladle.average_to_file([member], out)
    assert uploaded == ["avg.safetensors.json", "avg.safetensors"]
    assert exists(f"{out}.json") and not exists(out)  # provenance without output: never the reverse
    monkeypatch.setattr(FsspecStorage, "upload", real_upload)
    result = ladle.average_to_file([member], out)  # the leftover provenance is no reason to refuse
    assert result.path == out and exists(out)


def output_folder(where: str) -> str:
    """A folder under `where` for outputs (made when local: a local output's folder must exist)."""
    folder = f"{where}/outputs"
    if "://" not in where or where.startswith("file://"):
        os.makedirs(folder.removeprefix("file://"), exist_ok=True)
    return folder


def test_an_output_that_appears_while_writing_is_not_replaced(where: str) -> None:
    out = f"{output_folder(where)}/avg.safetensors"
    with pytest.raises(ladle.OutputExists, match="appeared while writing"), atomic_path(out) as tmp:
        save_file({"w": torch.ones(2)}, tmp)
        with fsspec.open(out, "wb") as handle:  # another writer, between the check and the upload
            handle.write(b"theirs")
    assert read_bytes(out) == b"theirs"


def test_soup_writes_to_a_url(trained: str, where: str, model: torch.nn.Module) -> None:
    out = f"{where}/runs/soup.safetensors"
    assert cli(["soup", trained, "--recipe", "top:2", "-o", out]) == 0
    assert set(safetensors_load(read_bytes(out))) == set(model.state_dict())
    assert json.loads(read_bytes(f"{out}.json"))["recipe"].startswith("top:2")
    result = ladle.soup(trained, "top:2", output=f"{where}/runs/soup.pt", into_run=True)
    assert result.path == output_location(f"{where}/runs/soup.pt")
    assert sorted(torch.load(io.BytesIO(read_bytes(result.path)), weights_only=True)) == sorted(
        safetensors_load(read_bytes(out))
    )
    assert result.checkpoint is not None and ladle.Run(trained).get(result.checkpoint.name).kind == "soup"


def test_a_running_soup_is_kept_up_to_date_at_a_url(where: str, model: torch.nn.Module) -> None:
    out = f"{where}/runs/running.safetensors"
    running = ladle.RunningSoup("last:2", out)
    with ladle.CheckpointManager(f"{where}/runs/exp1", model=model, running_soup=running) as manager:
        for step in (1, 2, 3):
            with torch.no_grad():
                model[0].weight.fill_(float(step))
            manager.save(step=step)
            soup = safetensors_load(read_bytes(out))
            expected = (step + max(step - 1, 1)) / 2
            assert torch.equal(soup["0.weight"], torch.full_like(soup["0.weight"], expected)), step
    assert [m["step"] for m in json.loads(read_bytes(f"{out}.json"))["members"]] == [2, 3]


def test_export_writes_to_a_url(trained: str, where: str) -> None:
    out = f"{where}/runs/weights.safetensors"
    result = ladle.export_checkpoint(f"{trained}/best", out)
    assert result.output == output_location(out) and result.bytes_after == len(read_bytes(out))
    expected = ladle.load_source(f"{trained}/step-000000020").state_dict()
    exported = safetensors_load(read_bytes(out))
    assert exported.keys() == expected.keys()
    assert all(torch.equal(exported[k], v) for k, v in expected.items())
    assert cli(["export", f"{trained}/best", "-o", out]) == 2  # exists, no --force
    assert cli(["export", f"{trained}/best", "-o", out, "--force", "--dtype", "fp16"]) == 0
    assert safetensors_load(read_bytes(out))["0.weight"].dtype == torch.float16


def test_a_torchscript_export_is_checked_then_uploaded_to_a_url(trained: str, where: str) -> None:
    out = f"{where}/runs/model.pt"
    result = ladle.export_checkpoint(
        f"{trained}/best", out, to="torchscript", model=tiny_model, inputs=[(2, 4)]
    )
    assert result.max_abs_diff is not None and result.max_abs_diff <= 1e-6
    with warnings.catch_warnings():
        # torch.jit.load is deprecated: a DeprecationWarning in torch 2.13, a FutureWarning from 2.14
        warnings.filterwarnings("ignore", r"`torch\.jit\.load` is deprecated", DeprecationWarning)
        warnings.filterwarnings("ignore", r"`torch\.jit\.load` is deprecated", FutureWarning)
        scripted = torch.jit.load(io.BytesIO(read_bytes(out)))
    weights = ladle.load_source(f"{trained}/step-000000020").state_dict()
    assert torch.equal(scripted.state_dict()["0.weight"], weights["0.weight"])


def test_report_draws_a_run_into_a_url(trained: str, where: str) -> None:
    pytest.importorskip("matplotlib")
    out = f"{where}/runs/report.png"
    assert cli(["report", trained, "-o", out]) == 0
    assert read_bytes(out).startswith(b"\x89PNG")


def test_an_output_to_a_missing_bucket_is_one_line_before_any_work(
    s3_endpoint: str, tmp_path: Path, model: torch.nn.Module, capsys: pytest.CaptureFixture[str]
) -> None:
    member = tmp_path / "member.safetensors"
    save_file(model.state_dict(), member)
    url = "s3://no-such-bucket-here/avg.safetensors"
    assert cli(["avg", str(member), "-o", url]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and url in err and "does not exist" in err, err


def test_a_torch_pickle_on_a_url_is_read_and_its_download_deleted(
    where: str, model: torch.nn.Module, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"{where}/weights.pt"
    with fsspec.open(url, "wb", auto_mkdir=True) as handle:
        torch.save(model.state_dict(), handle)
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)
    with ladle.load_source(url) as source:
        assert torch.equal(source.tensor("0.weight"), model.state_dict()["0.weight"])
    assert list((tmp_path / "tmp").iterdir()) == []


# -- errors on stores ----------------------------------------------------------------------


def test_a_missing_bucket_is_one_line_naming_the_url(s3_endpoint: str) -> None:
    with pytest.raises(
        ladle.StorageError,
        match=r"^s3://no-such-bucket-here/runs/exp1: the bucket 'no-such-bucket-here' does not exist",
    ):
        ladle.Run("s3://no-such-bucket-here/runs/exp1", create=True)


def test_an_unreachable_endpoint_from_storage_options_is_one_line(s3_endpoint: str) -> None:
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    options = {
        "endpoint_url": f"http://127.0.0.1:{port}",
        "retries": 1,
        "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 1},
    }
    with pytest.raises(
        ladle.StorageError, match=r"cannot reach the store .*check the network and the endpoint"
    ) as info:
        ladle.Run("s3://some-bucket/runs/exp1", create=True, storage_options=options)
    assert "\n" not in str(info.value)


def test_cli_reports_a_missing_bucket_in_one_line_and_exits_1(
    s3_endpoint: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli(["ls", "s3://no-such-bucket-here/runs/exp1"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no-such-bucket-here" in err, err


def test_avg_refuses_a_member_whose_bytes_changed_on_the_store(trained: str, tmp_path: Path) -> None:
    member = f"{trained}/step-000000010"
    with fsspec.open(f"{member}/model.safetensors", "rb") as handle:
        data = bytearray(handle.read())
    data[-1] ^= 0xFF  # same size, one byte of the last tensor changed
    with fsspec.open(f"{member}/model.safetensors", "wb") as handle:
        handle.write(bytes(data))
    with pytest.raises(ladle.CorruptCheckpoint, match="step-000000010"):
        ladle.average_to_file([member, f"{trained}/step-000000020"], tmp_path / "avg.safetensors")


# -- integrations ------------------------------------------------------------------------


@pytest.mark.filterwarnings(r"ignore:`isinstance\(treespec, LeafSpec\)` is deprecated:FutureWarning")
def test_lightning_saves_into_a_run_on_a_url_and_resumes_from_it_exactly(where: str, tmp_path: Path) -> None:
    pytest.importorskip("lightning")
    from tests.test_integration_lightning import LadleCheckpoint, assert_same, fit, state_of

    _, straight = fit(tmp_path / "a", LadleCheckpoint(f"{where}/a"), max_epochs=2)
    fit(tmp_path / "b", LadleCheckpoint(f"{where}/b"), max_epochs=1)
    second = LadleCheckpoint(f"{where}/b")
    path = second.resume_path()
    assert path is not None and path.endswith("lightning.ckpt")
    _, resumed = fit(tmp_path / "b", second, ckpt_path=path, max_epochs=2)
    assert_same(state_of(resumed), state_of(straight))
    assert [c.epoch for c in ladle.Run(f"{where}/b")] == [0, 1]


def test_verify_checks_and_parses_files_on_a_url_and_finds_changed_bytes(
    trained: str, capsys: pytest.CaptureFixture[str]
) -> None:
    weights = f"{trained}/step-000000030/model.safetensors"
    with fsspec.open(weights, "rb") as handle:
        data = handle.read()
    problems = ladle.Run(trained).verify("step-000000030")
    assert problems == []
    with fsspec.open(weights, "wb") as handle:  # one byte of the header changed, same size
        handle.write(data[:8] + b"[" + data[9:])
    problems = ladle.Run(trained).verify("step-000000030")
    assert len(problems) == 1 and "model.safetensors" in problems[0]
    assert cli(["verify", trained]) != 0
