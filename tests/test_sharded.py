"""Sharded (FSDP2 / DCP) checkpoints on two CPU ranks (gloo): exact resume, crashes, resharding."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

import ladle
from tests.conftest import ScriptServer

pytestmark = pytest.mark.slow
STEPS = 10  # 6 steps per epoch on 2 ranks: 10 ends mid-epoch 1


def _train(
    server: ScriptServer, run: Path, out: Path, world: int, steps: int, *extra: str, ok: bool = True
) -> None:
    """`fsdp_train.py RUN OUT WORLD STEPS EXTRA...`, forked from the server (see `ScriptServer`);
    with `ok=False` it must end because a rank was SIGKILLed."""
    out.mkdir(parents=True, exist_ok=True)
    code, output = server.run_capturing(str(run), str(out), str(world), str(steps), *extra, timeout=240)
    if ok:
        assert code == 0, "\n".join(output[-40:])
    else:
        assert code != 0 and any("SIGKILL" in line for line in output), "\n".join(output[-40:])


def _losses(out: Path, rank: int) -> dict[int, str]:
    """The loss of every step; a step run again after a resume overwrites the first attempt's."""
    found: dict[int, str] = {}
    for line in (out / f"losses-{rank}.txt").read_text().splitlines():
        step, loss = line.split()
        found[int(step)] = loss
    return found


def _final(out: Path) -> dict:
    return torch.load(out / "final.pt", weights_only=True)


def _assert_same_state(a: dict, b: dict) -> None:
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for param, state in a["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(value, b["optimizer"]["state"][param][name]), (param, name)


@pytest.fixture(scope="module")
def reference(fsdp_train: ScriptServer, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """An uninterrupted 2-rank run of STEPS steps: its run directory and outputs."""
    root = tmp_path_factory.mktemp("reference")
    _train(fsdp_train, root / "run", root / "out", 2, STEPS)
    return root / "run", root / "out"


def test_every_rank_writes_its_shard_and_rank_zero_commits(reference: tuple[Path, Path]) -> None:
    run = ladle.Run(reference[0])
    assert [c.step for c in run.checkpoints()] == [2, 4, 6, 8, 10]
    latest = run.latest()
    assert latest is not None
    # Each rank writes one DCP file per registered object: the model's (n=0), the optimizer's (n=1).
    shards = {"__0_0.distcp", "__0_1.distcp", "__1_0.distcp", "__1_1.distcp"}
    assert {".metadata", *shards, "rank-00000.pt", "rank-00001.pt", "state.pt"} == set(latest.files)
    assert run.verify() == []


def test_reading_the_model_of_a_sharded_checkpoint_touches_only_the_model_files(
    reference: tuple[Path, Path],
) -> None:
    latest = ladle.Run(reference[0]).latest()
    assert latest is not None
    with ladle.load_source(latest.path) as source:  # what `ladle avg` reads and hashes
        assert sorted(Path(f).name for f in source.files) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
        assert sorted(Path(f).name for f in source.recorded) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
        # Every rank's files carry both checksums (each rank hashed what it wrote).
        assert all(r.sha256 and r.xxh3_128 for r in source.recorded.values())


def test_an_fsdp2_run_killed_mid_epoch_resumes_bit_exact(
    fsdp_train: ScriptServer, reference: tuple[Path, Path], tmp_path: Path
) -> None:
    run, out = tmp_path / "run", tmp_path / "out"
    _train(fsdp_train, run, out, 2, STEPS, "--kill-rank", "-1", "--kill-step", "7", ok=False)
    assert ladle.Run(run).latest().step == 6  # type: ignore[union-attr]
    _train(fsdp_train, run, out, 2, STEPS)
    _assert_same_state(_final(out), _final(reference[1]))
    for rank in (0, 1):
        assert _losses(out, rank) == _losses(reference[1], rank)


def test_a_rank_killed_mid_save_commits_nothing_and_the_previous_checkpoint_resumes(
    fsdp_train: ScriptServer, reference: tuple[Path, Path], tmp_path: Path
) -> None:
    run, out = tmp_path / "run", tmp_path / "out"
    _train(fsdp_train, run, out, 2, STEPS, "--kill-rank", "1", "--kill-step", "4", ok=False)
    assert [c.step for c in ladle.Run(run).checkpoints()] == [2]
    assert any(p.name.startswith(".tmp-step-000000004") for p in run.iterdir())
    _train(fsdp_train, run, out, 2, STEPS)
    assert not any(p.name.startswith(".tmp-") for p in run.iterdir())
    _assert_same_state(_final(out), _final(reference[1]))


def test_two_ranks_reshard_to_one_process(
    fsdp_train: ScriptServer, reference: tuple[Path, Path], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    run = tmp_path / "run"
    subprocess.run(["cp", "-r", str(reference[0]), str(run)], check=True)
    _train(fsdp_train, run, out, 1, STEPS, "--plain")
    assert _final(out)["model"].keys() == _final(reference[1])["model"].keys()
    for key, value in _final(reference[1])["model"].items():
        assert torch.equal(_final(out)["model"][key], value), key


def test_two_ranks_reshard_to_four(
    fsdp_train: ScriptServer, reference: tuple[Path, Path], tmp_path: Path
) -> None:
    run, out = tmp_path / "run", tmp_path / "out"
    subprocess.run(["cp", "-r", str(reference[0]), str(run)], check=True)
    _train(fsdp_train, run, out, 4, STEPS)
    for key, value in _final(reference[1])["model"].items():
        assert torch.equal(_final(out)["model"][key], value), key


def test_one_process_reshards_to_two_ranks(fsdp_train: ScriptServer, tmp_path: Path) -> None:
    run = tmp_path / "run"
    _train(fsdp_train, run, tmp_path / "one", 1, 4, "--plain")
    _train(fsdp_train, run, tmp_path / "two", 2, 4)
    for key, value in _final(tmp_path / "one")["model"].items():
        assert torch.equal(_final(tmp_path / "two")["model"][key], value), key


def test_a_sharded_checkpoint_is_read_whole_without_a_process_group(reference: tuple[Path, Path]) -> None:
    latest = ladle.Run(reference[0]).latest()
    assert latest is not None
    with ladle.load_source(latest.path) as source:
        assert source.format == "ladle"
        assert source.step == STEPS
        full = _final(reference[1])["model"]
        assert sorted(source.keys()) == sorted(full)
        for key in full:
            assert torch.equal(source.tensor(key), full[key])


def test_background_sharded_saves_hold_the_state_at_each_call(
    fsdp_train: ScriptServer, reference: tuple[Path, Path], tmp_path: Path
) -> None:
    run, out = tmp_path / "run", tmp_path / "out"
    _train(fsdp_train, run, out, 2, STEPS, "--async-save")
    _assert_same_state(_final(out), _final(reference[1]))
    listed = ladle.Run(run)
    assert [c.step for c in listed.checkpoints()] == [2, 4, 6, 8, 10]
    assert listed.verify() == []
    for info in listed.checkpoints():  # every checkpoint equals the synchronous run's at that step
        with ladle.load_source(info.path) as ours, ladle.load_source(reference[0] / info.name) as theirs:
            for key in theirs:
                assert torch.equal(ours.tensor(key), theirs.tensor(key)), (info.name, key)


def test_inspect_shows_the_sharded_entries_and_the_rank_files(
    reference: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    from ladle.cli.main import main

    assert main(["inspect", str(reference[0]), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    entries = {item["name"]: item for item in report["training_state"]}
    assert entries["dcp:model"]["kind"] == "weights"
    assert entries["dcp:optimizer"]["kind"] == "optimizer"
    assert "rank-00000.pt..rank-00001.pt" in entries


def test_a_soup_of_sharded_checkpoints_equals_the_soup_of_their_consolidated_weights(
    reference: tuple[Path, Path], tmp_path: Path
) -> None:
    from ladle.cli.main import main

    result = ladle.soup(reference[0], "last:3")
    exported = []
    for info in result.members:
        target = tmp_path / f"{info.name}.safetensors"
        assert main(["export", info.path, "-o", str(target)]) == 0
        exported.append(str(target))
    consolidated = ladle.average(exported)
    assert result.state_dict is not None and result.state_dict.keys() == consolidated.keys()
    for key, value in consolidated.items():
        assert torch.equal(result.state_dict[key], value), key
