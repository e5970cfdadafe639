"""CheckpointManager: complete state in, complete state out; clear errors for bad input."""

from __future__ import annotations

import json
import logging
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from torch import nn

import ladle
from ladle.errors import ConfigError, ManagerClosed, NotARunDirectory
from tests.conftest import tiny_model, train_steps


def full_state(seed: int = 0):
    model = tiny_model(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    return model, optimizer, scheduler, scaler


def test_save_and_resume_restore_every_object(tmp_path: Path) -> None:
    model, optimizer, scheduler, scaler = full_state()
    train_steps(model, optimizer, 3)
    for _ in range(3):
        scheduler.step()
    scaler.scale(torch.ones(()))  # initialise the scale lazily, as a training step would
    scaler.update(512.0)
    with ladle.CheckpointManager(
        tmp_path / "run",
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=scaler,
        config={"lr": 0.01, "layers": [4, 8, 2]},
    ) as manager:
        manager.extras["note"] = "hello"
        manager.step(3, metrics={"loss": 0.25}, epoch=1)
        info = manager.save()
    assert info.step == 3 and info.epoch == 1 and info.metrics == {"loss": 0.25}
    assert set(info.files) == {"model.safetensors", "state.pt"}
    assert info.extra["config"] == {"lr": 0.01, "layers": [4, 8, 2]}

    fresh = full_state(seed=1)
    with ladle.CheckpointManager(
        tmp_path / "run", model=fresh[0], optimizer=fresh[1], scheduler=fresh[2], scaler=fresh[3]
    ) as manager:
        point = manager.resume()
        assert (point.step, point.epoch, point.mid_epoch) == (3, 1, True)
        assert manager.extras == {"note": "hello"}
        assert manager.history[-1]["metrics"] == {"loss": 0.25}
    for a, b in zip(model.state_dict().values(), fresh[0].state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert fresh[2].state_dict() == scheduler.state_dict()
    assert fresh[3].get_scale() == 512.0
    for index, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            assert torch.equal(value, fresh[1].state_dict()["state"][index][key])


def test_state_file_loads_with_weights_only(tmp_path: Path) -> None:
    model, optimizer, scheduler, _ = full_state()
    with ladle.CheckpointManager(
        tmp_path / "run", model=model, optimizer=optimizer, scheduler=scheduler
    ) as m:
        info = m.save(step=1)
    payload = torch.load(info.file("state.pt"), weights_only=True)
    assert payload["kinds"] == {"optimizer": "optimizer", "scheduler": "scheduler", "manager": "manager"}
    assert set(payload["rng"]) >= {"python", "numpy", "torch"}


def test_rng_states_are_restored(tmp_path: Path, model) -> None:
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    with ladle.CheckpointManager(tmp_path / "run", model=model) as manager:
        manager.save(step=1)
        expected = (random.random(), np.random.rand(), torch.rand(1))
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    with ladle.CheckpointManager(tmp_path / "run", model=model) as manager:
        manager.resume()
        assert (random.random(), np.random.rand()) == expected[:2]
        assert torch.equal(torch.rand(1), expected[2])


def test_an_epoch_end_checkpoint_resumes_at_the_next_epoch(tmp_path: Path, model) -> None:
    with ladle.CheckpointManager(tmp_path / "run", model=model) as manager:
        manager.epoch_end(4, step=50)
    with ladle.CheckpointManager(tmp_path / "run", model=model) as manager:
        point = manager.resume()
        assert (point.step, point.epoch, point.mid_epoch) == (50, 5, False)


def test_a_fresh_run_resumes_to_none(tmp_path: Path, model) -> None:
    with ladle.CheckpointManager(tmp_path / "run", model=model) as manager:
        assert manager.resume() is None


def test_compiled_and_ddp_style_wrappers_save_clean_keys_and_load_into_either(tmp_path: Path) -> None:
    model = tiny_model()
    compiled = torch.compile(model)
    with ladle.CheckpointManager(tmp_path / "run", model=compiled) as manager:
        info = manager.save(step=1)
    with safe_open(info.file("model.safetensors"), "pt") as handle:
        assert sorted(handle.keys()) == ["0.bias", "0.weight", "3.bias", "3.weight"]
    plain = tiny_model(seed=5)
    wrapped = nn.DataParallel(tiny_model(seed=6))
    for target in (plain, wrapped):
        with ladle.CheckpointManager(tmp_path / "run", model=target) as manager:
            manager.resume()
        assert torch.equal(ladle.state.model_weights.unwrap_model(target)[0].weight, model[0].weight)


def test_ddp_wrapped_model_saves_clean_keys(tmp_path: Path) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        ddp = nn.parallel.DistributedDataParallel(tiny_model())
        with ladle.CheckpointManager(tmp_path / "run", model=ddp) as manager:
            info = manager.save(step=1)
        with safe_open(info.file("model.safetensors"), "pt") as handle:
            assert not [k for k in handle.keys() if k.startswith("module.")]  # noqa: SIM118
        fresh = nn.parallel.DistributedDataParallel(tiny_model(seed=3))
        with ladle.CheckpointManager(tmp_path / "run", model=fresh) as manager:
            manager.resume()
        assert torch.equal(fresh.module[0].weight, ddp.module[0].weight)
    finally:
        dist.destroy_process_group()


class TiedLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight


def test_tied_weights_are_stored_once_and_stay_tied(tmp_path: Path) -> None:
    model = TiedLM()
    with ladle.CheckpointManager(tmp_path / "run", model=model) as manager:
        info = manager.save(step=1)
    with safe_open(info.file("model.safetensors"), "pt") as handle:
        assert len(list(handle.keys())) == 1
        assert json.loads(handle.metadata()["ladle.aliases"])
    fresh = TiedLM()
    with ladle.CheckpointManager(tmp_path / "run", model=fresh) as manager:
        manager.resume()
    assert torch.equal(fresh.head.weight, model.embed.weight)
    assert fresh.head.weight is fresh.embed.weight


def test_optimizer_state_lands_on_the_parameters_device(tmp_path: Path) -> None:
    model, optimizer, _, _ = full_state()
    train_steps(model, optimizer, 1)
    with ladle.CheckpointManager(tmp_path / "run", model=model, optimizer=optimizer) as manager:
        manager.save(step=1)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    fresh = tiny_model(1).to(device)
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=0.01)
    with ladle.CheckpointManager(tmp_path / "run", model=fresh, optimizer=fresh_opt) as manager:
        manager.resume()
    for state in fresh_opt.state.values():
        assert state["exp_avg"].device.type == device


def test_resume_best_and_by_name_and_step(tmp_path: Path, model) -> None:
    with ladle.CheckpointManager(tmp_path / "run", model=model, monitor="loss") as manager:
        for step, loss in [(1, 0.9), (2, 0.1), (3, 0.5)]:
            manager.save(step=step, metrics={"loss": loss})
    with ladle.CheckpointManager(tmp_path / "run", model=model, monitor="loss") as manager:
        assert manager.resume("best").step == 2
        assert manager.resume("step-000000001").step == 1
        assert manager.resume(3).step == 3
        assert manager.resume(str(tmp_path / "run" / "step-000000002")).step == 2


def test_resume_from_a_checkpoint_of_another_run(tmp_path: Path) -> None:
    source = tiny_model(1)
    with ladle.CheckpointManager(tmp_path / "a", model=source) as manager:
        info = manager.save(step=7)
    target = tiny_model(2)
    with ladle.CheckpointManager(tmp_path / "b", model=target) as manager:
        assert manager.resume(info.path).step == 7
    assert torch.equal(target[0].weight, source[0].weight)


def test_saving_again_at_the_same_step_supersedes_the_older_checkpoint(tmp_path: Path, model) -> None:
    with ladle.CheckpointManager(
        tmp_path / "run", model=model, every_steps=10, every_epochs=1, monitor="val"
    ) as manager:
        manager.step(10)
        saved = manager.epoch_end(0, step=10, metrics={"val": 0.3})
        assert saved.metrics == {"val": 0.3}
        assert [c.name for c in manager.run.checkpoints()] == [saved.name]
        assert manager.save() == saved  # nothing new: no new checkpoint


def test_after_resuming_an_older_checkpoint_new_saves_become_latest(tmp_path: Path, model) -> None:
    with ladle.CheckpointManager(tmp_path / "run", model=model, monitor="loss") as manager:
        for step, loss in [(1, 0.1), (2, 0.5), (3, 0.6)]:
            manager.save(step=step, metrics={"loss": loss})
    with ladle.CheckpointManager(tmp_path / "run", model=model, monitor="loss") as manager:
        manager.resume("best")
        again = manager.save(step=2, metrics={"loss": 0.2})
        assert again.name == "step-000000002-1"
        assert manager.latest == again


def test_a_mismatched_model_lists_missing_unexpected_and_mismatched_keys(tmp_path: Path, model) -> None:
    with ladle.CheckpointManager(tmp_path / "run", model=model) as manager:
        manager.save(step=1)
    other = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(0.1), nn.Linear(16, 2), nn.Linear(2, 2))
    with ladle.CheckpointManager(tmp_path / "run", model=other) as manager:
        with pytest.raises(ladle.StateMismatch) as caught:
            manager.resume()
    message = str(caught.value)
    assert "model.safetensors: the saved weights do not fit the model" in message
    assert "missing keys [4.bias, 4.weight] (2)" in message
    assert "shape mismatches [0.bias (saved [8], model [16])" in message
    assert "\n" not in message
    # Nothing was changed in the live model.
    assert other[0].weight.shape == (16, 4)


def test_missing_registered_objects_are_named(tmp_path: Path, model) -> None:
    with ladle.CheckpointManager(tmp_path / "run", model=model) as manager:
        manager.save(step=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with ladle.CheckpointManager(tmp_path / "run", model=model, optimizer=optimizer) as manager:
        with pytest.raises(ladle.StateMismatch, match=r"state.pt: no saved state for \['optimizer'\]"):
            manager.resume()
        assert manager.resume(strict=False).step == 1


def corrupt(path: str) -> None:
    data = bytearray(Path(path).read_bytes())
    data[len(data) // 2] ^= 0xFF
    Path(path).write_bytes(bytes(data))


def test_a_corrupted_state_file_is_named_and_fallback_uses_the_previous_checkpoint(
    tmp_path: Path, model
) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with ladle.CheckpointManager(tmp_path / "run", model=model, optimizer=optimizer) as manager:
        manager.save(step=1)
        bad = manager.save(step=2)
    corrupt(bad.file("state.pt"))
    with ladle.CheckpointManager(tmp_path / "run", model=model, optimizer=optimizer) as manager:
        with pytest.raises(ladle.CorruptCheckpoint, match=r"step-000000002/state.pt: .*fallback=True"):
            manager.resume()
        assert manager.resume(fallback=True).step == 1


def test_a_truncated_weights_file_is_named(tmp_path: Path, model) -> None:
    with ladle.CheckpointManager(tmp_path / "run", model=model) as manager:
        manager.save(step=1)
        bad = manager.save(step=2)
    with open(bad.file("model.safetensors"), "r+b") as handle:
        handle.truncate(100)
    with ladle.CheckpointManager(tmp_path / "run", model=model) as manager:
        with pytest.raises(
            ladle.CorruptCheckpoint, match=r"model.safetensors: truncated or changed \(100 bytes"
        ):
            manager.resume()
        assert manager.resume(fallback=True).step == 1


def test_fallback_with_nothing_older_says_so(tmp_path: Path, model) -> None:
    with ladle.CheckpointManager(tmp_path / "run", model=model) as manager:
        bad = manager.save(step=1)
    corrupt(bad.file("state.pt"))
    with ladle.CheckpointManager(tmp_path / "run", model=model) as manager:
        with pytest.raises(ladle.CorruptCheckpoint, match="no earlier good checkpoint"):
            manager.resume(fallback=True)


def test_an_unknown_checkpoint_name_is_an_error(tmp_path: Path, model) -> None:
    with ladle.CheckpointManager(tmp_path / "run", model=model) as manager:
        manager.save(step=1)
        with pytest.raises(ladle.CheckpointNotFound, match="no checkpoint 'step-000000042'"):
            manager.resume("step-000000042")


def test_a_run_directory_that_is_a_file_is_an_error(tmp_path: Path, model) -> None:
    (tmp_path / "run").write_text("oops")
    with pytest.raises(NotARunDirectory, match="is a file, not a run directory"):
        ladle.CheckpointManager(tmp_path / "run", model=model)


def test_state_that_would_need_unpickling_code_is_refused_at_save(tmp_path: Path, model) -> None:
    class Custom:
        def state_dict(self):
            return {"when": time.struct_time((2026, 1, 1, 0, 0, 0, 0, 1, 0))}

        def load_state_dict(self, state):
            pass

    with ladle.CheckpointManager(tmp_path / "run", model=model, state={"custom": Custom()}) as manager:
        with pytest.raises(
            ConfigError, match=r"\['custom'\]\['when'\] is a time.struct_time; ladle saves only"
        ):
            manager.save(step=1)
        assert manager.run.checkpoints() == []
    assert not [p for p in (tmp_path / "run").iterdir() if p.name.startswith(".tmp")]


def test_objects_without_state_dict_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"state\['thing'\] is a object without state_dict"):
        ladle.CheckpointManager(tmp_path / "run", state={"thing": object()})


def test_a_closed_manager_refuses_to_work(tmp_path: Path, model) -> None:
    manager = ladle.CheckpointManager(tmp_path / "run", model=model)
    manager.close()
    manager.close()
    with pytest.raises(ManagerClosed, match="is closed"):
        manager.save(step=1)


def test_a_sampler_and_user_objects_round_trip(tmp_path: Path, model) -> None:
    loader = ladle.ResumableDataLoader(list(range(20)), batch_size=4, shuffle=True, seed=3)
    seen = []
    for batch in loader:
        seen.append(batch.tolist())
        if len(seen) == 2:
            break
    with ladle.CheckpointManager(tmp_path / "run", model=model, data=loader) as manager:
        manager.save(step=2)
    fresh = ladle.ResumableDataLoader(list(range(20)), batch_size=4, shuffle=True, seed=3)
    with ladle.CheckpointManager(tmp_path / "run", model=model, data=fresh) as manager:
        manager.resume()
    rest = [b.tolist() for b in fresh]
    full = [
        b.tolist() for b in ladle.ResumableDataLoader(list(range(20)), batch_size=4, shuffle=True, seed=3)
    ]
    assert seen + rest == full


PREEMPT = """
import sys, time, torch, ladle
from torch import nn
model = nn.Linear(2, 2)
with ladle.CheckpointManager(sys.argv[1], model=model, every_steps=10**6, save_on_signal=True) as m:
    for step in range(1, 10**6):
        time.sleep(0.01)
        if step == 5:
            print("ready", flush=True)
        m.step(step)
"""


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_triggers_a_final_save_and_exit(tmp_path: Path, signum: int) -> None:
    process = subprocess.Popen(
        [sys.executable, "-c", PREEMPT, str(tmp_path / "run")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdout.readline().strip() == "ready"
    process.send_signal(signum)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 128 + signum  # 130 for Ctrl-C, 143 for SIGTERM
    run = ladle.Run(tmp_path / "run")
    assert len(run.checkpoints()) == 1 and run.latest().step >= 5
    assert f"saved {run.latest().name} after signal {int(signum)}; exiting" in err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err


def test_a_pending_signal_counts_as_a_reason_to_stop(tmp_path: Path, model) -> None:
    with ladle.CheckpointManager(
        tmp_path / "run", model=model, save_on_signal=True, exit_after_signal_save=False
    ) as manager:
        assert not manager.should_stop
        signal.raise_signal(signal.SIGTERM)
        assert manager.should_stop and manager.stop_reason.startswith("signal 15")
        saved = manager.step(1)
        assert saved is not None and saved.step == 1 and not manager.should_stop


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda m: m.step("abc"), r"step='abc' is not allowed; use an integer >= 0"),
        (lambda m: m.step(-5), r"step=-5 is not allowed; use an integer >= 0"),
        (lambda m: m.step(2.5), r"step=2\.5 is not allowed"),
        (lambda m: m.epoch_end(-1), r"epoch=-1 is not allowed"),
        (lambda m: m.save(step=True), r"step=True is not allowed"),
        (lambda m: m.step(1, metrics={"acc": object()}), r"step\(metrics\)\['acc'\]=<object"),
        (lambda m: m.save(metrics=[1, 2]), r"save\(metrics\)=\[1, 2\] is not allowed; use a mapping"),
    ],
)
def test_bad_call_arguments_are_refused_before_anything_is_written(
    tmp_path: Path, model, call, message
) -> None:
    with ladle.CheckpointManager(tmp_path / "run", model=model, every_steps=1) as manager:
        with pytest.raises(ConfigError, match=message):
            call(manager)
        assert manager.run.checkpoints() == []
    assert not any(p.name.startswith("step-") for p in (tmp_path / "run").iterdir())


@pytest.mark.parametrize("run_dir", [None, "", 3])
def test_a_run_directory_must_be_named(tmp_path: Path, model, run_dir, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"run_dir=.* is not allowed; use a (run )?directory path"):
        ladle.CheckpointManager(run_dir, model=model)  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []


def test_fallback_names_the_checkpoint_it_loads(tmp_path: Path, model, caplog) -> None:
    with ladle.CheckpointManager(tmp_path / "run", model=model) as manager:
        for step in (1, 2, 3):
            manager.save(step=step)
    with ladle.CheckpointManager(tmp_path / "run", model=model) as manager:
        manager.resume("step-000000001")
        manager.save(step=4)  # committed after step 3, so seq order differs from step order
    corrupt(str(tmp_path / "run" / "step-000000004" / "state.pt"))
    with ladle.CheckpointManager(tmp_path / "run", model=model) as manager:
        with caplog.at_level(logging.WARNING, logger="ladle"):
            point = manager.resume(fallback=True)
    assert point.checkpoint.name == "step-000000003"
    assert "falling back to step-000000003" in caplog.text


def test_latest_is_the_newest_training_checkpoint_not_a_soup(tmp_path: Path, model) -> None:
    with ladle.CheckpointManager(tmp_path / "run", model=model) as manager:
        manager.save(step=1)
        trained = manager.save(step=2)
        manager.soup("last:2", into_run=True)
        assert manager.latest.name == trained.name
    run = ladle.Run(tmp_path / "run")
    assert run.latest().name == trained.name and run.get("latest").name == trained.name
    assert run.latest(kind=None).kind == "soup"
    assert json.loads((tmp_path / "run" / "ladle.json").read_text())["latest"] == trained.name


def test_storage_options_reach_the_runs_store(s3_endpoint: str) -> None:
    # The environment points at a working S3 server; only the options name a dead endpoint.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
    options = {"endpoint_url": dead, "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 1}}
    with pytest.raises(ladle.StorageError, match=r"cannot reach the store"):
        ladle.CheckpointManager("s3://some-bucket/runs/exp1", model=tiny_model(), storage_options=options)
