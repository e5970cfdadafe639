"""Output folders of other tools (timm, Lightning, transformers Trainer) read as read-only runs:
`ladle ls`, `ladle verify`, `ladle soup` and `ladle.soup` on them, with their own metrics."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ladle.averaging.selection import select
from ladle.cli.main import main
from ladle.formats import load_source
from ladle.store.foreign_runs import foreign_tool
from ladle.store.lightning_dirs import lightning_checkpoints, name_metrics
from ladle.store.timm_dirs import timm_checkpoints
from ladle.store.verification import verify_path
from tests.foreign_checkpoints import TIMM_EVAL_TOP1, fairseq_checkpoint, timm_checkpoint, timm_output


def _ls_json(path: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> dict:
    assert main(["ls", str(path), "--json", *extra]) == 0
    return json.loads(capsys.readouterr().out)


# -- timm ---------------------------------------------------------------------------


def test_timm_folder_lists_numbered_checkpoints_with_summary_metrics(tmp_path: Path) -> None:
    out = timm_output(tmp_path / "timm")
    assert foreign_tool(out) == "timm"
    found = timm_checkpoints(str(out))
    # timm keeps the 3 best epochs by eval_top1; last/model_best are links to them, not members.
    assert [(c.name, c.epoch, c.metrics["eval_top1"]) for c in found] == [
        ("checkpoint-2.pth.tar", 2, 61.0),
        ("checkpoint-3.pth.tar", 3, 58.0),
        ("checkpoint-4.pth.tar", 4, 60.0),
    ]
    assert "epoch" not in found[0].metrics and found[0].metrics["eval_loss"] == pytest.approx(1.5 - 0.61)


def test_top_k_by_eval_top1_selects_from_a_timm_folder(tmp_path: Path) -> None:
    out = timm_output(tmp_path / "timm", keep=5)
    _, chosen = select(str(out), "top:3:eval_top1:max")
    assert [c.epoch for c in chosen] == sorted(e for e in TIMM_EVAL_TOP1 if TIMM_EVAL_TOP1[e] >= 58.0)


def test_cli_soup_of_a_timm_folder_averages_the_chosen_epochs(tmp_path: Path) -> None:
    out = timm_output(tmp_path / "timm", keep=5)
    target = tmp_path / "soup.safetensors"
    assert main(["soup", str(out), "--recipe", "top:2:eval_top1:max", "-o", str(target)]) == 0
    expected = {}
    for epoch in (2, 4):
        with load_source(out / f"checkpoint-{epoch}.pth.tar") as source:
            expected[epoch] = source.tensor("0.weight").clone()
    with load_source(target) as soup:
        assert torch.allclose(soup.tensor("0.weight"), (expected[2] + expected[4]) / 2)


def test_ls_lists_a_timm_folder_with_its_metrics(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = timm_output(tmp_path / "timm")
    record = _ls_json(out, capsys, "--best-by", "eval_top1", "--mode", "max")
    assert record["tool"] == "timm"
    rows = record["checkpoints"]
    assert [r["name"] for r in rows] == [f"checkpoint-{e}.pth.tar" for e in (2, 3, 4)]
    assert [r["name"] for r in rows if r["best"]] == ["checkpoint-2.pth.tar"]
    assert rows[-1]["latest"] and rows[0]["metrics"]["eval_top1"] == 61.0


def test_ls_table_of_a_timm_folder_says_no_checksums(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = timm_output(tmp_path / "timm")
    assert main(["ls", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "a timm output folder" in printed and "no checksums recorded" in printed


def test_verify_a_timm_folder_parses_every_checkpoint_and_says_no_checksums(tmp_path: Path) -> None:
    out = timm_output(tmp_path / "timm")
    result = verify_path(out)
    assert result.ok and len(result.checkpoints) == 3
    assert all("no checksums" in c.notes[0] for c in result.checkpoints)


def test_verify_names_a_truncated_timm_checkpoint(tmp_path: Path) -> None:
    out = timm_output(tmp_path / "timm")
    damaged = out / "checkpoint-3.pth.tar"
    data = damaged.read_bytes()
    damaged.unlink()  # not the hard-linked inode of last/model_best
    damaged.write_bytes(data[: len(data) // 2])
    result = verify_path(out)
    assert [c.name for c in result.checkpoints if not c.ok] == ["checkpoint-3.pth.tar"]
    assert main(["verify", str(out)]) == 1


def test_timm_ema_weights_are_chosen_with_key_ema(tmp_path: Path) -> None:
    saved = timm_checkpoint(tmp_path / "checkpoint-0.pth.tar", 0)
    with load_source(tmp_path / "checkpoint-0.pth.tar") as raw:
        assert torch.equal(raw.tensor("0.weight"), saved["state_dict"]["0.weight"])
    with load_source(tmp_path / "checkpoint-0.pth.tar", key="ema") as ema:
        assert torch.equal(ema.tensor("0.weight"), saved["state_dict_ema"]["0.weight"])


def test_cli_avg_ema_of_timm_checkpoints(tmp_path: Path) -> None:
    a = timm_checkpoint(tmp_path / "a.pth.tar", 0)
    b = timm_checkpoint(tmp_path / "b.pth.tar", 1)
    target = tmp_path / "ema.safetensors"
    assert (
        main(
            [
                "avg",
                str(tmp_path / "a.pth.tar"),
                str(tmp_path / "b.pth.tar"),
                "--ema",
                "-o",
                str(target),
            ]
        )
        == 0
    )
    mean = (a["state_dict_ema"]["0.weight"] + b["state_dict_ema"]["0.weight"]) / 2
    with load_source(target) as soup:
        assert torch.allclose(soup.tensor("0.weight"), mean)


def test_key_ema_without_ema_weights_names_the_keys_looked_for(tmp_path: Path) -> None:
    torch.save({"state_dict": {"w": torch.ones(2)}, "optimizer": {"state": {}}}, tmp_path / "plain.pt")
    with pytest.raises(Exception, match="no EMA weights .*state_dict_ema"):
        load_source(tmp_path / "plain.pt", key="ema")


# -- fairseq ------------------------------------------------------------------------


@pytest.mark.parametrize("legacy", [True, False])
def test_fairseq_checkpoint_loads_without_trust_with_its_update_count(tmp_path: Path, legacy: bool) -> None:
    saved = fairseq_checkpoint(tmp_path / "checkpoint_2_500.pt", 500, legacy=legacy)
    with load_source(tmp_path / "checkpoint_2_500.pt") as source:
        assert source.step == 500 and source.metadata["epoch"] == 2
        assert torch.equal(source.tensor("1.weight"), saved["model"]["1.weight"])


# -- Lightning ----------------------------------------------------------------------


def _lightning_ckpt(path: Path, step: int, epoch: int, score: float, *, monitor: str = "val_loss") -> None:
    key = f"ModelCheckpoint{{'monitor': '{monitor}', 'mode': 'min', 'every_n_train_steps': 0}}"
    torch.save(
        {
            "epoch": epoch,
            "global_step": step,
            "pytorch-lightning_version": "2.5.0",
            "state_dict": {"net.weight": torch.full((2, 2), float(step))},
            "loops": {},
            "callbacks": {
                key: {"monitor": monitor, "current_score": torch.tensor(score), "best_k_models": {}}
            },
            "optimizer_states": [],
            "lr_schedulers": [],
        },
        path,
    )


def test_lightning_folder_scores_come_from_model_checkpoint_state(tmp_path: Path) -> None:
    folder = tmp_path / "lightning_logs" / "version_0" / "checkpoints"
    folder.mkdir(parents=True)
    _lightning_ckpt(folder / "epoch=0-step=4.ckpt", 4, 0, 0.8)
    _lightning_ckpt(folder / "epoch=1-step=8.ckpt", 8, 1, 0.6)
    _lightning_ckpt(folder / "last.ckpt", 8, 1, 0.6)
    version = folder.parent
    assert foreign_tool(version) == "lightning"
    found, monitor = lightning_checkpoints(str(version))
    assert monitor == {"metric": "val_loss", "mode": "min"}
    # last.ckpt holds the same step as epoch=1-step=8.ckpt: counted once
    assert [(c.name, c.step, c.epoch, c.metrics) for c in found] == [
        ("epoch=0-step=4.ckpt", 4, 0, {"val_loss": pytest.approx(0.8)}),
        ("epoch=1-step=8.ckpt", 8, 1, {"val_loss": pytest.approx(0.6)}),
    ]
    _, chosen = select(str(version), "top:1")  # the recorded monitor fills in top:K
    assert [c.name for c in chosen] == ["epoch=1-step=8.ckpt"]


def test_metrics_in_lightning_file_names() -> None:
    assert name_metrics("epoch=3-step=120-val_loss=0.41.ckpt") == {"val_loss": 0.41}
    assert name_metrics("sample-mnist-epoch=02-val_acc=0.93.ckpt") == {"val_acc": 0.93}


def test_ls_of_a_lightning_folder_marks_the_best(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _lightning_ckpt(tmp_path / "epoch=0-step=4.ckpt", 4, 0, 0.5)
    _lightning_ckpt(tmp_path / "epoch=1-step=8.ckpt", 8, 1, 0.7)
    record = _ls_json(tmp_path, capsys)
    assert record["monitor"] == {"metric": "val_loss", "mode": "min"}
    assert [r["name"] for r in record["checkpoints"] if r["best"]] == ["epoch=0-step=4.ckpt"]


# -- transformers Trainer, and soups beside a run ------------------------------------


def _trainer_checkpoint(folder: Path, step: int) -> None:
    folder.mkdir(parents=True)
    save_file({"w": torch.full((2,), float(step))}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text("{}")
    state = {"global_step": step, "epoch": 1.0, "log_history": [{"eval_loss": 1 / step, "step": step}]}
    (folder / "trainer_state.json").write_text(json.dumps(state))


def test_verify_a_trainer_output_folder_calls_nothing_damaged(tmp_path: Path) -> None:
    out = tmp_path / "out"
    for step in (2, 4):
        _trainer_checkpoint(out / f"checkpoint-{step}", step)
    result = verify_path(out)
    assert result.ok and [c.name for c in result.checkpoints] == ["checkpoint-2", "checkpoint-4"]
    assert "no checksums: written by transformers" in result.checkpoints[0].notes[0]


def test_verify_names_an_incomplete_shard_set_of_a_trainer_checkpoint(tmp_path: Path) -> None:
    out = tmp_path / "out"
    _trainer_checkpoint(out / "checkpoint-2", 2)
    folder = out / "checkpoint-4"
    _trainer_checkpoint(folder, 4)
    (folder / "model.safetensors").rename(folder / "model-00001-of-00002.safetensors")
    index = {"weight_map": {"w": "model-00001-of-00002.safetensors", "v": "model-00002-of-00002.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    result = verify_path(out)
    assert [c.name for c in result.checkpoints if not c.ok] == ["checkpoint-4"]
    assert "model-00002-of-00002.safetensors is missing" in result.problems[0]


def test_a_soup_folder_beside_a_ladle_run_is_not_called_damaged(tmp_path: Path) -> None:
    from ladle import CheckpointManager
    from tests.conftest import tiny_model

    run = tmp_path / "run"
    with CheckpointManager(str(run), model=tiny_model()) as manager:
        manager.save(step=1)
    soup_dir = run / "soup"
    soup_dir.mkdir()
    save_file({"w": torch.ones(2)}, str(soup_dir / "model.safetensors"))
    (soup_dir / "model.safetensors.json").write_text("{}")
    (soup_dir / "config.json").write_text("{}")
    result = verify_path(run)
    assert result.ok
    assert any("a soup or average" in n for c in result.checkpoints for n in c.notes)
    assert main(["verify", str(run)]) == 0


def test_a_ladle_named_folder_without_meta_is_still_damaged(tmp_path: Path) -> None:
    from ladle import CheckpointManager
    from tests.conftest import tiny_model

    run = tmp_path / "run"
    with CheckpointManager(str(run), model=tiny_model()) as manager:
        manager.save(step=1)
        manager.save(step=2)
    os.remove(run / "step-000000002" / "meta.json")
    result = verify_path(run)
    assert [c.name for c in result.checkpoints if not c.ok] == ["step-000000002"]


def test_inspect_names_the_weight_sets_of_a_timm_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    timm_checkpoint(tmp_path / "checkpoint-0.pth.tar", 0)
    assert main(["inspect", str(tmp_path / "checkpoint-0.pth.tar")]) == 0
    assert "weight sets: state_dict (read by default), state_dict_ema (EMA: --ema" in capsys.readouterr().out


def test_avg_of_a_timm_folder_takes_the_numbered_checkpoints_only(tmp_path: Path) -> None:
    from ladle.averaging.member_paths import expand

    out = timm_output(tmp_path / "timm")
    assert [Path(p).name for p in expand([str(out)])] == [f"checkpoint-{e}.pth.tar" for e in (2, 3, 4)]


def test_cli_soup_ema_of_a_timm_folder(tmp_path: Path) -> None:
    out = timm_output(tmp_path / "timm", keep=5)
    target = tmp_path / "ema.safetensors"
    assert main(["soup", str(out), "--recipe", "top:2:eval_top1:max", "--ema", "-o", str(target)]) == 0
    expected = []
    for epoch in (2, 4):
        with load_source(out / f"checkpoint-{epoch}.pth.tar", key="ema") as source:
            expected.append(source.tensor("0.weight").clone())
    with load_source(target) as soup:
        assert torch.allclose(soup.tensor("0.weight"), (expected[0] + expected[1]) / 2)
