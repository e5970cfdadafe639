"""LadleCallback and Trainer output directories (real transformers Trainer, tiny GPT-2 built from a config)."""

from __future__ import annotations

import importlib
import json
import logging
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from ladle import ConfigError, Keep, Run
from ladle.errors import MissingDependency, OutputExists
from ladle.integrations.trainer_output import (
    epoch_index,
    metrics_at,
    soup_trainer_output,
    trainer_checkpoints,
)
from ladle.integrations.transformers import LadleCallback
from ladle.store.commit import PendingCheckpoint

STEPS = 8  # 32 samples, batch 4: one epoch


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny models run fastest on one thread, and do not fight other tests for the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class Tokens(torch.utils.data.Dataset):
    """Random token sequences; the labels are the inputs (causal language modelling)."""

    def __init__(self, n: int, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, 100, (n, 16), generator=generator)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def tiny_gpt2() -> GPT2LMHeadModel:
    config = GPT2Config(
        vocab_size=100,
        n_positions=32,
        n_embd=32,
        n_layer=2,
        n_head=2,
        resid_pdrop=0,
        embd_pdrop=0,
        attn_pdrop=0,
    )
    torch.manual_seed(0)
    return GPT2LMHeadModel(config)


def arguments(output_dir: Path, **overrides: Any) -> TrainingArguments:
    settings: dict[str, Any] = {
        "use_cpu": True,
        "report_to": [],
        "save_strategy": "steps",
        "save_steps": 2,
        "eval_strategy": "steps",
        "eval_steps": 2,
        "logging_steps": 2,
        "max_steps": STEPS,
        "per_device_train_batch_size": 4,
        "per_device_eval_batch_size": 4,
        "learning_rate": 5e-3,
        "disable_tqdm": True,
        "seed": 0,
    }
    settings.update(overrides)
    return TrainingArguments(str(output_dir), **settings)


def train(
    output_dir: Path, callbacks: list[Any], model: Any = None, resume: str | None = None, **overrides: Any
):
    model = model if model is not None else tiny_gpt2()
    trainer = Trainer(
        model=model,
        args=arguments(output_dir, **overrides),
        train_dataset=Tokens(32, 0),
        eval_dataset=Tokens(8, 1),
        callbacks=callbacks,
    )
    trainer.train(resume_from_checkpoint=resume)
    return trainer, model


def weights(folder: str | Path) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(folder, "model.safetensors"))


def mean(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: sum(s[k] for s in states) / len(states) for k in states[0]}


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


# -- recording in place ----------------------------------------------------------------


def test_records_trainer_checkpoints_in_place(tmp_path: Path) -> None:
    train(tmp_path, [LadleCallback()])
    run = Run(tmp_path)
    assert [c.name for c in run.checkpoints()] == [
        "checkpoint-2",
        "checkpoint-4",
        "checkpoint-6",
        "checkpoint-8",
    ]
    newest = run.latest()
    assert newest is not None
    assert {"model.safetensors", "config.json", "optimizer.pt", "trainer_state.json"} <= set(newest.files)
    assert run.verify() == []


def test_records_the_metrics_of_each_checkpoints_step(tmp_path: Path) -> None:
    train(tmp_path, [LadleCallback()], max_steps=4)
    for info in Run(tmp_path).checkpoints():
        log = json.loads(Path(info.file("trainer_state.json")).read_text())["log_history"]
        evaluation = next(e for e in log if e["step"] == info.step and "eval_loss" in e)
        assert info.metrics["eval_loss"] == evaluation["eval_loss"]
        assert "loss" in info.metrics and "learning_rate" in info.metrics
        assert not any(k.endswith(("_runtime", "_per_second")) for k in info.metrics)


def test_monitor_defaults_to_the_trainers_metric_for_best_model(tmp_path: Path) -> None:
    train(tmp_path, [LadleCallback()], max_steps=2, metric_for_best_model="loss", greater_is_better=False)
    assert Run(tmp_path).monitor == {"metric": "eval_loss", "mode": "min"}


def test_keep_best_uses_the_trainers_metric_for_best_model(tmp_path: Path) -> None:
    trainer, _ = train(tmp_path, [LadleCallback(keep=Keep(best=1))], metric_for_best_model="eval_loss")
    evaluations = [e for e in trainer.state.log_history if "eval_loss" in e]
    best = min(evaluations, key=lambda e: e["eval_loss"])["step"]
    assert {c.step for c in Run(tmp_path).checkpoints()} == {best, STEPS}  # the best and the latest


def test_keep_best_without_any_monitor_is_refused_when_training_starts(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="metric_for_best_model"):
        train(tmp_path, [LadleCallback(keep=Keep(best=1))], max_steps=2)


def test_keep_deletes_trainer_checkpoints_but_never_the_trainers_best(tmp_path: Path) -> None:
    callback = LadleCallback(keep=Keep(last=1))
    trainer, _ = train(tmp_path, [callback], metric_for_best_model="eval_loss", load_best_model_at_end=True)
    best = os.path.basename(trainer.state.best_model_checkpoint)
    names = sorted(c.name for c in Run(tmp_path).checkpoints())
    assert names == sorted({best, "checkpoint-8"})
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == names


def test_a_step_saved_again_after_resuming_is_recorded_again(tmp_path: Path) -> None:
    callback = LadleCallback()
    train(tmp_path, [callback], max_steps=4)
    before = Run(tmp_path).get("checkpoint-4")
    train(tmp_path, [LadleCallback()], resume=callback.resume_path(2, run_dir=tmp_path), max_steps=4, seed=1)
    run = Run(tmp_path)
    after = run.get("checkpoint-4")
    assert after.time > before.time
    assert after.files["trainer_state.json"].sha256 != before.files["trainer_state.json"].sha256
    assert run.verify() == []


def test_resume_path_ignores_a_folder_the_trainer_did_not_finish(tmp_path: Path) -> None:
    callback = LadleCallback()
    train(tmp_path, [callback], max_steps=4)
    unfinished = tmp_path / "checkpoint-6"
    unfinished.mkdir()
    (unfinished / "config.json").write_text("{}")
    assert callback.resume_path(run_dir=tmp_path) == str(tmp_path / "checkpoint-4")


def test_resume_path_needs_the_output_dir_when_recording_in_place() -> None:
    with pytest.raises(ConfigError, match="run_dir="):
        LadleCallback().resume_path()


def test_training_again_after_a_crash_in_the_same_process_is_not_locked_out(tmp_path: Path) -> None:
    class Crash(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.global_step == 3:
                raise RuntimeError("boom")

    first = LadleCallback()  # still referenced, as a notebook keeps the failed trainer around
    with pytest.raises(RuntimeError, match="boom"):
        train(tmp_path, [first, Crash()])
    train(tmp_path, [LadleCallback()], max_steps=4)
    assert [c.step for c in Run(tmp_path).checkpoints()] == [2, 4]


# -- committing into a separate run -----------------------------------------------------


def test_commits_copies_that_outlive_the_trainers_rotation(tmp_path: Path) -> None:
    train(tmp_path / "out", [LadleCallback(tmp_path / "run")], save_total_limit=1)
    assert [p.name for p in (tmp_path / "out").glob("checkpoint-*")] == ["checkpoint-8"]
    run = Run(tmp_path / "run")
    assert [c.step for c in run.checkpoints()] == [2, 4, 6, 8]
    assert_same(weights(run.latest().path), weights(tmp_path / "out" / "checkpoint-8"))  # type: ignore[union-attr]
    assert run.verify() == []


def test_async_saves_commit_the_trainers_checkpoint_as_it_was_at_the_save(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    commit = PendingCheckpoint.commit

    def slow_commit(self: PendingCheckpoint, **kwargs: Any) -> Any:
        time.sleep(0.05)  # training goes on while the background thread commits
        return commit(self, **kwargs)

    class Clobber(TrainerCallback):  # runs after LadleCallback: the Trainer's folder changes afterwards
        def __init__(self) -> None:
            self.at_save: dict[int, dict[str, torch.Tensor]] = {}

        def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            path = Path(args.output_dir) / f"checkpoint-{state.global_step}" / "model.safetensors"
            self.at_save[state.global_step] = load_file(path)
            save_file({k: torch.zeros_like(v) for k, v in self.at_save[state.global_step].items()}, path)

    monkeypatch.setattr(PendingCheckpoint, "commit", slow_commit)
    clobber = Clobber()
    train(tmp_path / "out", [LadleCallback(tmp_path / "run", async_save=True), clobber])
    run = Run(tmp_path / "run")
    assert [c.step for c in run.checkpoints()] == [2, 4, 6, 8]
    for info in run.checkpoints():
        assert_same(weights(info.path), clobber.at_save[info.step])
    assert run.verify() == []


def test_async_saves_are_refused_when_recording_in_place(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"async_save=True\) needs run_dir="):
        LadleCallback(async_save=True)
    with pytest.raises(ConfigError, match="may rotate or rewrite them"):
        train(tmp_path, [LadleCallback(tmp_path, async_save=True)])


@pytest.mark.slow
def test_training_resumes_exactly_from_a_committed_checkpoint(tmp_path: Path) -> None:
    constant = {"lr_scheduler_type": "constant"}  # the same schedule whatever max_steps is
    train(tmp_path / "a", [LadleCallback(tmp_path / "run")], max_steps=4, **constant)
    callback = LadleCallback(tmp_path / "run")
    start = callback.resume_path()
    assert start == str(tmp_path / "run" / "checkpoint-4")
    _, resumed = train(tmp_path / "b", [callback], resume=start, **constant)

    _, straight = train(tmp_path / "c", [], **constant)
    assert_same(resumed.state_dict(), straight.state_dict())
    assert [c.step for c in Run(tmp_path / "run").checkpoints()] == [2, 4, 6, 8]


def test_ladle_triggers_ask_the_trainer_for_saves(tmp_path: Path) -> None:
    train(tmp_path, [LadleCallback(every_steps=3)], save_strategy="no", eval_strategy="no")
    assert [c.step for c in Run(tmp_path).checkpoints()] == [3, 6]


def test_on_improvement_saves_at_evaluations_that_improve(tmp_path: Path) -> None:
    scores = iter([3.0, 2.0, 2.5, 1.0])  # one per evaluation, at steps 2, 4, 6, 8
    callback = LadleCallback(monitor="eval_score", on_improvement=True)
    trainer = Trainer(
        model=tiny_gpt2(),
        args=arguments(tmp_path, save_strategy="no"),
        train_dataset=Tokens(32, 0),
        eval_dataset=Tokens(8, 1),
        callbacks=[callback],
        compute_metrics=lambda prediction: {"score": next(scores)},
    )
    trainer.train()
    assert [(c.step, c.metrics["eval_score"]) for c in Run(tmp_path).checkpoints()] == [
        (2, 3.0),
        (4, 2.0),
        (8, 1.0),
    ]


# -- soups ------------------------------------------------------------------------------


def test_soup_folder_loads_with_from_pretrained(tmp_path: Path) -> None:
    train(tmp_path, [LadleCallback(soup="last:2")])
    soup = tmp_path / "soup"
    assert {"config.json", "generation_config.json", "model.safetensors"} <= {p.name for p in soup.iterdir()}
    assert not (soup / "optimizer.pt").exists() and not (soup / "trainer_state.json").exists()
    model = AutoModelForCausalLM.from_pretrained(soup)
    expected = mean([weights(tmp_path / "checkpoint-6"), weights(tmp_path / "checkpoint-8")])
    loaded = model.state_dict()
    torch.testing.assert_close({k: loaded[k] for k in expected}, expected)
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()  # still tied


def test_load_soup_puts_the_soup_into_the_trainers_model(tmp_path: Path) -> None:
    callback = LadleCallback(soup="top:2:eval_loss:min", load_soup=True)
    _, model = train(tmp_path, [callback], max_steps=6)
    chosen = sorted(Run(tmp_path).checkpoints(), key=lambda c: c.metrics["eval_loss"])[:2]
    expected = mean([weights(c.path) for c in chosen])
    state = model.state_dict()
    torch.testing.assert_close({k: state[k] for k in expected}, expected)
    assert callback.soup_dir == str(tmp_path / "soup")


def test_soup_of_a_separate_run_goes_to_the_chosen_folder(tmp_path: Path) -> None:
    callback = LadleCallback(tmp_path / "run", soup="last:2", soup_output=tmp_path / "final")
    train(tmp_path / "out", [callback], max_steps=4)
    assert (tmp_path / "final" / "config.json").is_file()
    expected = mean([weights(tmp_path / "run" / "checkpoint-2"), weights(tmp_path / "run" / "checkpoint-4")])
    torch.testing.assert_close(weights(tmp_path / "final"), expected)


def test_a_bad_recipe_fails_before_training(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="top"):
        LadleCallback(soup="top:3:eval_loss")


# -- plain Trainer output directories ---------------------------------------------------


def test_soup_of_a_plain_trainer_output_directory(tmp_path: Path) -> None:
    train(tmp_path, [])
    history = trainer_checkpoints(tmp_path)
    assert [c.name for c in history] == ["checkpoint-2", "checkpoint-4", "checkpoint-6", "checkpoint-8"]
    result = soup_trainer_output(tmp_path, "top:2:eval_loss:min")
    best = sorted(history, key=lambda c: c.metrics["eval_loss"])[:2]
    assert [m.name for m in result.members] == sorted(c.name for c in best)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "soup")
    expected = mean([weights(c.path) for c in best])
    loaded = model.state_dict()
    torch.testing.assert_close({k: loaded[k] for k in expected}, expected)


def _lowest_eval_loss(output_dir: Path, k: int) -> list[str]:
    """The k checkpoints with the lowest eval_loss, read from the newest trainer_state.json."""
    newest = max(output_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    history = json.loads((newest / "trainer_state.json").read_text())["log_history"]
    losses = {e["step"]: e["eval_loss"] for e in history if "eval_loss" in e}
    return [f"checkpoint-{step}" for step in sorted(losses, key=lambda s: (losses[s], s))[:k]]


def test_cli_soup_of_a_plain_trainer_output_directory(tmp_path: Path) -> None:
    from ladle.cli.main import main

    out = tmp_path / "out"
    train(out, [])
    best = _lowest_eval_loss(out, 2)
    assert main(["soup", str(out), "--recipe", "top:2:eval_loss:min", "-o", str(tmp_path / "soup")]) == 0
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "soup")
    expected = mean([weights(out / name) for name in best])
    loaded = model.state_dict()
    torch.testing.assert_close({k: loaded[k] for k in expected}, expected)


def test_cli_avg_of_a_trainer_output_directory_averages_its_checkpoints(tmp_path: Path) -> None:
    from ladle.averaging.provenance import read_provenance
    from ladle.cli.main import main

    trainer, _ = train(tmp_path / "out", [])
    trainer.save_model()  # the final model.safetensors beside the checkpoint folders
    assert (tmp_path / "out" / "model.safetensors").is_file()
    target = tmp_path / "avg.safetensors"
    assert main(["avg", str(tmp_path / "out"), "-o", str(target)]) == 0
    record = read_provenance(target)
    assert record is not None
    assert [os.path.basename(m["path"]) for m in record["members"]] == [
        f"checkpoint-{s}" for s in (2, 4, 6, 8)
    ]
    expected = mean([weights(tmp_path / "out" / f"checkpoint-{s}") for s in (2, 4, 6, 8)])
    torch.testing.assert_close(load_file(target), expected)


def test_soup_of_sharded_trainer_checkpoints_in_a_ladle_run(tmp_path: Path) -> None:
    from ladle.averaging.soups import soup
    from ladle.policies.rules import SaveRules
    from ladle.saving.engine import SaveEngine

    run = tmp_path / "run"
    states = []
    for seed, name in ((0, "checkpoint-2"), (1, "checkpoint-4")):
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(tiny_gpt2().config)
        model.save_pretrained(run / name, max_shard_size="20KB")
        assert (run / name / "model.safetensors.index.json").is_file()
        states.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    writer = SaveEngine(str(run), SaveRules())
    writer.record("checkpoint-2", step=2, epoch=0, metrics={})
    writer.record("checkpoint-4", step=4, epoch=0, metrics={})
    writer.close()
    soup(run, "last:2", output=tmp_path / "soup.safetensors")
    averaged = load_file(tmp_path / "soup.safetensors")
    assert "transformer.wte.weight" in averaged
    torch.testing.assert_close(averaged, {k: (states[0][k] + states[1][k]) / 2 for k in averaged})


def test_trainer_checkpoints_skips_a_folder_without_state(tmp_path: Path, caplog: Any) -> None:
    train(tmp_path, [], max_steps=2, eval_strategy="no")
    (tmp_path / "checkpoint-9").mkdir()
    with caplog.at_level(logging.WARNING, logger="ladle"):
        assert [c.step for c in trainer_checkpoints(tmp_path)] == [2]
    assert "checkpoint-9" in caplog.text


def test_metrics_at_merges_the_logs_of_one_step() -> None:
    history = [
        {"loss": 2.0, "learning_rate": 0.1, "epoch": 0.5, "step": 2},
        {"eval_loss": 1.5, "eval_runtime": 0.3, "eval_samples_per_second": 9.0, "epoch": 0.5, "step": 2},
        {"loss": 1.0, "step": 4},
    ]
    assert metrics_at(history, 2) == {"loss": 2.0, "learning_rate": 0.1, "eval_loss": 1.5}


@pytest.mark.parametrize(("epoch", "index"), [(0.25, 0), (1.0, 0), (1.5, 1), (0.0, 0), (None, None)])
def test_epoch_index_names_the_epoch_a_fractional_epoch_falls_in(
    epoch: float | None, index: int | None
) -> None:
    assert epoch_index(epoch) == index


# -- missing packages -------------------------------------------------------------------


def test_missing_transformers_names_the_extra_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)  # None in sys.modules: "not installed"
    monkeypatch.delitem(sys.modules, "ladle.integrations.transformers")
    with pytest.raises(MissingDependency, match=r"pip install 'ladle\[transformers\]'"):
        importlib.import_module("ladle.integrations.transformers")


def test_a_soup_of_a_trainer_directory_goes_to_a_url_as_a_from_pretrained_folder(tmp_path: Path) -> None:
    import fsspec

    import ladle

    train(tmp_path / "out", [])  # the Trainer's own checkpoint-* folders, no ladle run
    url = f"memory://ladle-{tmp_path.name}/soup"
    result = ladle.soup(tmp_path / "out", "last:2", output=url)
    assert (result.folder, result.path) == (url, f"{url}/model.safetensors")
    fs = fsspec.filesystem("memory")
    local = tmp_path / "downloaded"
    local.mkdir()
    for remote in fs.ls(url, detail=False):
        fs.get(remote, str(local / remote.rsplit("/", 1)[-1]))
    assert {"config.json", "model.safetensors", "model.safetensors.json"} <= {p.name for p in local.iterdir()}
    model = AutoModelForCausalLM.from_pretrained(local)
    expected = mean([weights(tmp_path / "out" / "checkpoint-6"), weights(tmp_path / "out" / "checkpoint-8")])
    loaded = model.state_dict()
    torch.testing.assert_close({k: loaded[k] for k in expected}, expected)
    with pytest.raises(OutputExists, match="objects exist under it"):
        ladle.soup(tmp_path / "out", "last:2", output=url)
