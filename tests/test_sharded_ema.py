"""An EMA of a sharded (FSDP2) model: DTensor averages saved through DCP, resumed, resharded, read back.

The multi-process tests run `scripts/fsdp_train.py --ema` on two CPU ranks (gloo); the
single-process ones save `sharded=True` checkpoints of a plain model, which take the
same DCP path without a process group.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

import ladle
from ladle.cli.main import main
from tests.conftest import ScriptServer, tiny_model, train_steps
from tests.test_sharded import STEPS, _final, _train


@pytest.fixture(scope="module")
def ema_reference(fsdp_train: ScriptServer, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """An uninterrupted 2-rank run of STEPS steps with an EMA: its run directory and outputs."""
    root = tmp_path_factory.mktemp("ema-reference")
    _train(fsdp_train, root / "run", root / "out", 2, STEPS, "--ema")
    return root / "run", root / "out"


def _assert_equal(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> None:
    assert ours.keys() == theirs.keys()
    for key, value in theirs.items():
        assert torch.equal(ours[key], value), key


@pytest.mark.slow
def test_each_rank_averages_its_shard_and_the_average_is_saved_beside_the_model(
    ema_reference: tuple[Path, Path],
) -> None:
    final = _final(ema_reference[1])
    # The sharded average equals the same average of the gathered full weights, step by step.
    _assert_equal(final["ema"], final["ema_reference"])
    _assert_equal(final["ema_applied"], final["ema"])  # applied() swaps each rank's shard in
    _assert_equal(final["raw_after_applied"], final["model"])  # and puts the raw shard back
    latest = ladle.Run(ema_reference[0]).latest()
    assert latest is not None and "ema.safetensors" not in latest.files
    assert ladle.Run(ema_reference[0]).verify() == []
    with ladle.load_source(latest.path, key="ema") as source:  # one process, no process group
        _assert_equal(source.state_dict(), final["ema"])


@pytest.mark.slow
def test_a_killed_run_resumes_its_sharded_ema_bit_exact(
    fsdp_train: ScriptServer, ema_reference: tuple[Path, Path], tmp_path: Path
) -> None:
    run, out = tmp_path / "run", tmp_path / "out"
    _train(fsdp_train, run, out, 2, STEPS, "--ema", "--kill-rank", "-1", "--kill-step", "7", ok=False)
    _train(fsdp_train, run, out, 2, STEPS, "--ema")
    _assert_equal(_final(out)["ema"], _final(ema_reference[1])["ema"])
    _assert_equal(_final(out)["model"], _final(ema_reference[1])["model"])


@pytest.mark.slow
def test_the_ema_reshards_from_two_ranks_to_one_process(
    fsdp_train: ScriptServer, ema_reference: tuple[Path, Path], tmp_path: Path
) -> None:
    run = tmp_path / "run"
    subprocess.run(["cp", "-r", str(ema_reference[0]), str(run)], check=True)
    _train(fsdp_train, run, tmp_path / "out", 1, STEPS, "--plain", "--ema")
    _assert_equal(_final(tmp_path / "out")["ema"], _final(ema_reference[1])["ema"])


@pytest.mark.slow
def test_the_ema_reshards_from_one_process_to_two_ranks(fsdp_train: ScriptServer, tmp_path: Path) -> None:
    run = tmp_path / "run"
    _train(fsdp_train, run, tmp_path / "one", 1, 4, "--plain", "--ema")
    _train(fsdp_train, run, tmp_path / "two", 2, 4, "--ema")
    _assert_equal(_final(tmp_path / "two")["ema"], _final(tmp_path / "one")["ema"])


@pytest.mark.slow
def test_one_process_exports_and_averages_the_ema_of_sharded_checkpoints(
    ema_reference: tuple[Path, Path], tmp_path: Path
) -> None:
    run = ladle.Run(ema_reference[0])
    members = [run.get("step-000000008").path, run.get("step-000000010").path]
    exported = []
    for i, member in enumerate(members):
        exported.append(str(tmp_path / f"ema-{i}.safetensors"))
        assert main(["export", member, "--ema", "-o", exported[-1]]) == 0
    with ladle.load_source(exported[-1]) as source:  # the latest EMA, consolidated
        _assert_equal(source.state_dict(), _final(ema_reference[1])["ema"])
    averaged = tmp_path / "avg.safetensors"
    assert main(["avg", *members, "--ema", "-o", str(averaged)]) == 0
    with ladle.load_source(averaged) as source:
        _assert_equal(source.state_dict(), ladle.average(exported))


@pytest.mark.slow
def test_background_sharded_saves_hold_the_ema_at_each_call(
    fsdp_train: ScriptServer, ema_reference: tuple[Path, Path], tmp_path: Path
) -> None:
    run = tmp_path / "run"
    _train(fsdp_train, run, tmp_path / "out", 2, STEPS, "--ema", "--async-save")
    for info in ladle.Run(run).checkpoints():  # every EMA equals the synchronous run's at that step
        with (
            ladle.load_source(info.path, key="ema") as ours,
            ladle.load_source(ema_reference[0] / info.name, key="ema") as theirs,
        ):
            _assert_equal(ours.state_dict(), theirs.state_dict())


# -- one process, sharded=True: the same DCP path without a process group ---------------


def _sharded_run(path: Path, steps: int = 3) -> tuple[ladle.EMA, torch.nn.Module]:
    model = tiny_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
    ema = ladle.EMA(model, decay=0.5)
    with ladle.CheckpointManager(
        str(path), model=model, optimizer=optimizer, ema=ema, sharded=True, monitor="loss", mode="min"
    ) as manager:
        for step in range(1, steps + 1):
            train_steps(model, optimizer, 1, seed=step)
            ema.update()
            manager.save(step=step, metrics={"loss": float(abs(step - 2))})  # step 2 is the best
    return ema, model


def test_a_sharded_checkpoint_keeps_the_ema_in_its_own_dcp_files(tmp_path: Path) -> None:
    ema, _ = _sharded_run(tmp_path / "run")
    latest = ladle.Run(tmp_path / "run").latest()
    assert latest is not None
    # One file per registered object: the model, the EMA, the optimizer.
    assert {"__0_0.distcp", "__0_1.distcp", "__0_2.distcp"} <= set(latest.files)
    with ladle.load_source(latest.path, key="ema") as source:
        assert [Path(f).name for f in source.files] == [".metadata", "__0_1.distcp"]
        _assert_equal(source.state_dict(), {k: v.detach() for k, v in ema.weights().items()})
    with ladle.load_source(latest.path) as source:
        assert [Path(f).name for f in source.files] == [".metadata", "__0_0.distcp"]


def test_read_ema_weights_reads_a_sharded_checkpoint_whole(tmp_path: Path) -> None:
    from ladle.state.readers import read_ema_weights

    ema, _ = _sharded_run(tmp_path / "run")
    run = ladle.Run(tmp_path / "run")
    weights = read_ema_weights(run.storage, run.latest())  # type: ignore[arg-type]
    assert weights is not None
    _assert_equal(weights, {k: v.detach() for k, v in ema.weights().items()})


def test_a_sharded_manager_resumes_the_ema_counters_and_weights(tmp_path: Path) -> None:
    saved, _ = _sharded_run(tmp_path / "run")
    model = tiny_model(seed=1)
    ema = ladle.EMA(model, decay=0.5)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
    with ladle.CheckpointManager(
        str(tmp_path / "run"), model=model, optimizer=optimizer, ema=ema, sharded=True
    ) as manager:
        manager.resume()
    assert (ema.step, ema.num_updates) == (saved.step, saved.num_updates)
    _assert_equal(ema.weights(), saved.weights())


def test_restore_best_of_a_sharded_run_restores_the_best_ema(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _sharded_run(run)
    best = ladle.Run(run).get("step-000000002")
    with ladle.load_source(best.path, key="ema") as source:
        best_ema = source.state_dict()
    with ladle.load_source(best.path) as source:
        best_model = source.state_dict()
    model = tiny_model(seed=1)
    ema = ladle.EMA(model, decay=0.5)
    with ladle.CheckpointManager(
        str(run), model=model, ema=ema, sharded=True, monitor="loss", mode="min"
    ) as manager:
        assert manager.restore_best().name == best.name  # type: ignore[union-attr]
    _assert_equal(ema.weights(), best_ema)
    _assert_equal({k: v.detach() for k, v in model.state_dict().items()}, best_model)


def test_ls_and_inspect_show_the_ema_of_a_sharded_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _sharded_run(tmp_path / "run")
    capsys.readouterr()
    assert main(["ls", str(tmp_path / "run"), "--json"]) == 0
    assert all(row["ema"] for row in json.loads(capsys.readouterr().out)["checkpoints"])
    assert main(["inspect", str(tmp_path / "run"), "--json"]) == 0
    entries = {item["name"]: item for item in json.loads(capsys.readouterr().out)["training_state"]}
    assert entries["dcp:ema"]["kind"] == "ema"
    assert main(["inspect", str(tmp_path / "run"), "--ema", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert sorted(t["name"] for t in report["tensors"]) == ["0.bias", "0.weight", "3.bias", "3.weight"]


def test_a_checkpoint_with_one_dcp_file_per_rank_still_reads_verifies_and_resumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from torch.distributed.checkpoint import FileSystemWriter

    import ladle.saving.sharded as sharded

    # Checkpoints written before each object had files of its own: one DCP file per rank.
    monkeypatch.setattr(sharded, "_writer_class", lambda: FileSystemWriter)
    saved, model = _sharded_run(tmp_path / "run")
    monkeypatch.undo()
    run = ladle.Run(tmp_path / "run")
    latest = run.latest()
    assert latest is not None and not any(f.startswith("__0_1") for f in latest.files)
    assert run.verify() == []
    with ladle.load_source(latest.path) as source:
        assert [Path(f).name for f in source.files] == [".metadata", "__0_0.distcp"]
        _assert_equal(ladle.average([source]), {k: v.detach() for k, v in model.state_dict().items()})
    ema = ladle.EMA(tiny_model(seed=1), decay=0.5)
    with ladle.CheckpointManager(
        str(tmp_path / "run"),
        model=ema.model,
        optimizer=torch.optim.AdamW(ema.model.parameters()),
        ema=ema,
        sharded=True,
    ) as manager:
        manager.resume()
    _assert_equal(ema.weights(), saved.weights())
