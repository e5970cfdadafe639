"""LadleCheckpoint: a Lightning checkpoint callback that saves into a ladle run (real Lightning, tiny model)."""

from __future__ import annotations

import importlib
import json
import logging
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning.pytorch as L
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from ladle import ConfigError, Keep, Run
from ladle.cli.main import main
from ladle.errors import MissingDependency
from ladle.integrations.lightning import LIGHTNING_FILE, LadleCheckpoint
from ladle.store.commit import PendingCheckpoint

# Lightning 2.6 calls a torch pytree API that torch 2.13 deprecates; nothing ladle can change.
pytestmark = pytest.mark.filterwarnings(
    r"ignore:`isinstance\(treespec, LeafSpec\)` is deprecated:FutureWarning"
)

STEPS_PER_EPOCH = 8


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny models run fastest on one thread, and do not fight other tests for the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class Regressor(L.LightningModule):
    """y = sum(x) with a 2-layer MLP; optionally logs a scripted validation score per epoch."""

    def __init__(self, lr: float = 0.05, scores: Sequence[float] | None = None) -> None:
        super().__init__()
        self.save_hyperparameters()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self.net(x), y))
        if self.hparams.scores is not None:
            scores = self.hparams.scores
            self.log("score", float(scores[min(self.current_epoch, len(scores) - 1)]))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


def loaders() -> tuple[torch.utils.data.DataLoader, torch.utils.data.DataLoader]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(8 * STEPS_PER_EPOCH, 4, generator=generator)
    y = x.sum(dim=1, keepdim=True)
    train = torch.utils.data.TensorDataset(x, y)
    val = torch.utils.data.TensorDataset(x[:16], y[:16])
    return torch.utils.data.DataLoader(train, batch_size=8), torch.utils.data.DataLoader(val, batch_size=8)


def trainer(root: Path, callbacks: list[Any], module: Any = L, **kwargs: Any) -> Any:
    settings: dict[str, Any] = {
        "max_epochs": 2,
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "accelerator": "cpu",
        "devices": 1,
        "default_root_dir": str(root),
    }
    settings.update(kwargs)
    return module.Trainer(callbacks=callbacks, **settings)


def fit(
    root: Path, callback: LadleCheckpoint, model: Any = None, ckpt_path: str | None = None, **kwargs: Any
):
    model = model if model is not None else Regressor()
    tr = trainer(root, [callback], **kwargs)
    tr.fit(model, *loaders(), ckpt_path=ckpt_path)
    return tr, model


def state_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


# -- saving -----------------------------------------------------------------------------


def test_saves_every_epoch_by_default_in_place_of_model_checkpoint(tmp_path: Path) -> None:
    callback = LadleCheckpoint(tmp_path / "run")
    tr, _ = fit(tmp_path, callback)
    run = Run(tmp_path / "run")
    assert [(c.step, c.epoch) for c in run.checkpoints()] == [(STEPS_PER_EPOCH, 0), (2 * STEPS_PER_EPOCH, 1)]
    assert tr.checkpoint_callbacks == [callback]  # Lightning added no ModelCheckpoint of its own
    written = list(tmp_path.rglob("*.ckpt"))
    assert len(written) == 2 and all(p.parent.parent == tmp_path / "run" for p in written)


def test_each_checkpoint_holds_lightning_ckpt_and_module_weights(tmp_path: Path) -> None:
    callback = LadleCheckpoint(tmp_path / "run")
    _, model = fit(tmp_path, callback)
    latest = Run(tmp_path / "run").latest()
    assert latest is not None
    assert set(latest.files) == {"lightning.ckpt", "model.safetensors"}
    assert_same(load_file(latest.file("model.safetensors")), state_of(model))
    assert latest.extra["framework"] == "lightning"
    assert Run(tmp_path / "run").verify() == []


def test_module_loads_from_a_ladle_checkpoint_with_load_from_checkpoint(tmp_path: Path) -> None:
    callback = LadleCheckpoint(tmp_path / "run")
    _, model = fit(tmp_path, callback)
    restored = Regressor.load_from_checkpoint(callback.last_model_path)
    assert_same(state_of(restored), state_of(model))


def test_step_saves_wait_for_the_validation_of_their_step(tmp_path: Path) -> None:
    callback = LadleCheckpoint(tmp_path / "run", every_steps=2)
    fit(tmp_path, callback, max_epochs=1, val_check_interval=4)
    checkpoints = Run(tmp_path / "run").checkpoints()
    assert [c.step for c in checkpoints] == [2, 4, 6, 8]
    assert [c.seq for c in checkpoints] == [1, 2, 3, 4]  # each written once, never superseded
    assert ["val_loss" in c.metrics for c in checkpoints] == [False, True, False, True]
    assert all("train_loss" in c.metrics for c in checkpoints)


def test_lightning_ckpt_holds_the_state_of_the_recorded_step(tmp_path: Path) -> None:
    callback = LadleCheckpoint(tmp_path / "run", every_steps=4)
    fit(tmp_path, callback, max_epochs=1, val_check_interval=4)
    for info in Run(tmp_path / "run").checkpoints():
        saved = torch.load(info.file(LIGHTNING_FILE), weights_only=True)
        assert saved["global_step"] == info.step
        assert_same(saved["state_dict"], load_file(info.file("model.safetensors")))


class Recorded(Regressor):
    """Remembers its weights after each optimizer step, by global step."""

    def __init__(self) -> None:
        super().__init__()
        self.at_step: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.at_step[self.trainer.global_step] = state_of(self)


def test_async_saves_commit_the_state_at_each_save_while_training_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write = PendingCheckpoint.write

    def slow_write(self: PendingCheckpoint, filename: str, writer: Any) -> None:
        time.sleep(0.02)  # training takes further steps while the background thread writes
        write(self, filename, writer)

    monkeypatch.setattr(PendingCheckpoint, "write", slow_write)
    callback = LadleCheckpoint(tmp_path / "run", every_steps=3, async_save=True, ema=0.9)
    _, model = fit(tmp_path, callback, model=Recorded(), max_epochs=2)
    checkpoints = Run(tmp_path / "run").checkpoints()
    assert [c.step for c in checkpoints] == [3, 6, 9, 12, 15]
    for info in checkpoints:
        assert_same(load_file(info.file("model.safetensors")), model.at_step[info.step])
        saved = torch.load(info.file(LIGHTNING_FILE), weights_only=True)
        assert saved["global_step"] == info.step
        assert_same(saved["state_dict"], model.at_step[info.step])
    assert Run(tmp_path / "run").verify() == []


def test_on_improvement_saves_only_new_bests(tmp_path: Path) -> None:
    callback = LadleCheckpoint(tmp_path / "run", monitor="score", on_improvement=True)
    fit(tmp_path, callback, Regressor(scores=[3.0, 2.0, 2.5, 1.0, 1.5]), max_epochs=5)
    assert [c.metrics["score"] for c in Run(tmp_path / "run").checkpoints()] == [3.0, 2.0, 1.0]


def test_keep_applies_retention_and_never_drops_the_best(tmp_path: Path) -> None:
    callback = LadleCheckpoint(tmp_path / "run", monitor="score", keep=Keep(last=2))
    fit(tmp_path, callback, Regressor(scores=[3.0, 1.0, 2.0, 2.5, 2.2]), max_epochs=5)
    assert [c.epoch for c in Run(tmp_path / "run").checkpoints()] == [1, 3, 4]


def test_a_monitor_that_is_never_logged_is_reported(tmp_path: Path, caplog: Any) -> None:
    with caplog.at_level(logging.WARNING, logger="ladle"):
        fit(tmp_path, LadleCheckpoint(tmp_path / "run", monitor="val_los"))
    assert "no checkpoint records the monitored metric 'val_los'" in caplog.text
    assert "val_loss" in caplog.text


def test_save_at_end_saves_a_run_stopped_mid_epoch(tmp_path: Path) -> None:
    callback = LadleCheckpoint(tmp_path / "run", save_at_end=True)
    fit(tmp_path, callback, max_epochs=-1, max_steps=STEPS_PER_EPOCH + 3)
    assert [c.step for c in Run(tmp_path / "run").checkpoints()] == [STEPS_PER_EPOCH, STEPS_PER_EPOCH + 3]


def test_gradient_accumulation_counts_optimizer_steps(tmp_path: Path) -> None:
    callback = LadleCheckpoint(tmp_path / "run", every_steps=2)
    fit(tmp_path, callback, max_epochs=1, accumulate_grad_batches=2, num_sanity_val_steps=0)
    assert [c.step for c in Run(tmp_path / "run").checkpoints()] == [2, 4]


def test_fast_dev_run_saves_nothing(tmp_path: Path) -> None:
    callback = LadleCheckpoint(tmp_path / "run")
    fit(tmp_path, callback, fast_dev_run=True)
    assert not (tmp_path / "run").exists() or Run(tmp_path / "run").checkpoints() == []


def test_sharded_strategies_are_refused_before_training(tmp_path: Path) -> None:
    stand_in = SimpleNamespace(
        strategy=L.strategies.FSDPStrategy(state_dict_type="sharded"), fast_dev_run=False, is_global_zero=True
    )
    with pytest.raises(ConfigError, match="state_dict_type='full'"):
        LadleCheckpoint(tmp_path / "run").setup(stand_in, Regressor(), "fit")
    assert not (tmp_path / "run").exists()


def test_run_lock_is_released_after_fit(tmp_path: Path) -> None:
    fit(tmp_path, LadleCheckpoint(tmp_path / "run"))
    Run(tmp_path / "run").acquire().release()  # would raise RunLocked if still held


def test_run_lock_is_released_when_training_fails(tmp_path: Path) -> None:
    class Failing(Regressor):
        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            if self.global_step == 3:
                raise RuntimeError("boom")
            return super().training_step(batch, batch_idx)

    with pytest.raises(RuntimeError, match="boom"):
        fit(tmp_path, LadleCheckpoint(tmp_path / "run", every_steps=2), Failing())
    Run(tmp_path / "run").acquire().release()
    assert [c.step for c in Run(tmp_path / "run").checkpoints()] == [2]


# -- EMA --------------------------------------------------------------------------------


def test_ema_weights_are_saved_beside_the_model(tmp_path: Path) -> None:
    callback = LadleCheckpoint(tmp_path / "run", ema=0.9)
    _, model = fit(tmp_path, callback)
    latest = Run(tmp_path / "run").latest()
    assert latest is not None and latest.extra["ema"] is True
    saved = load_file(latest.file("ema.safetensors"))
    assert_same(saved, {k: v.detach() for k, v in callback.ema.weights().items()})
    assert not torch.equal(saved["net.0.weight"], model.net[0].weight.detach())


def test_bad_ema_setting_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="ema="):
        LadleCheckpoint(tmp_path / "run", ema="fast")  # type: ignore[arg-type]


# -- resuming ---------------------------------------------------------------------------


def test_resume_path_is_none_for_a_new_run(tmp_path: Path) -> None:
    assert LadleCheckpoint(tmp_path / "run").resume_path() is None


def test_resume_with_ckpt_path_continues_exactly(tmp_path: Path) -> None:
    _, straight = fit(tmp_path / "a", LadleCheckpoint(tmp_path / "a" / "run", ema=0.9), max_epochs=4)

    fit(tmp_path / "b", LadleCheckpoint(tmp_path / "b" / "run", ema=0.9), max_epochs=2)
    second = LadleCheckpoint(tmp_path / "b" / "run", ema=0.9)
    _, resumed = fit(tmp_path / "b", second, ckpt_path=second.resume_path(), max_epochs=4)

    assert_same(state_of(resumed), state_of(straight))
    ema_a = load_file(str(Run(tmp_path / "a" / "run").latest().file("ema.safetensors")))  # type: ignore[union-attr]
    ema_b = load_file(str(Run(tmp_path / "b" / "run").latest().file("ema.safetensors")))  # type: ignore[union-attr]
    assert_same(ema_b, ema_a)
    assert [c.step for c in Run(tmp_path / "b" / "run").checkpoints()] == [8, 16, 24, 32]


class Shuffled(Regressor):
    """Dropout (draws from the global RNG every step) on a shuffled ResumableDataLoader; raises at
    `crash_at` to stand for a killed job."""

    crash_at: int | None = None

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.3), nn.ReLU(), nn.Linear(8, 1))
        self.seen: list[float] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if self.global_step == self.crash_at:
            raise RuntimeError("killed")
        self.seen.append(float(batch[0][0, 0]))
        return super().training_step(batch, batch_idx)


def shuffled_loader() -> torch.utils.data.DataLoader:
    from ladle import ResumableDataLoader

    train, _ = loaders()
    return ResumableDataLoader(train.dataset, batch_size=8, shuffle=True, seed=3)


def test_resume_mid_epoch_with_shuffling_and_dropout_continues_exactly(tmp_path: Path) -> None:
    def run(root: Path, model: Shuffled, ckpt_path: str | None = None) -> Shuffled:
        callback = LadleCheckpoint(root / "run", every_steps=4)
        trainer(root, [callback], max_epochs=2, num_sanity_val_steps=0).fit(
            model, shuffled_loader(), loaders()[1], ckpt_path=ckpt_path
        )
        return model

    torch.manual_seed(1)
    straight = run(tmp_path / "a", Shuffled())
    torch.manual_seed(1)
    interrupted = Shuffled()
    interrupted.crash_at = 12  # mid-way through the second epoch, after the save at step 12
    with pytest.raises(RuntimeError, match="killed"):
        run(tmp_path / "b", interrupted)
    resume = LadleCheckpoint(tmp_path / "b" / "run").resume_path()
    assert resume is not None and "step-000000012" in resume
    torch.manual_seed(99)  # the resumed process starts with other RNG states
    resumed = run(tmp_path / "b", Shuffled(), ckpt_path=resume)

    assert resumed.seen == straight.seen[12:]  # the rest of the interrupted epoch, same order
    assert straight.seen[8:16] != straight.seen[:8]  # the second epoch was shuffled anew
    assert_same(state_of(resumed), state_of(straight))


@pytest.mark.filterwarnings("ignore:You're resuming from a checkpoint that ended before the epoch ended")
def test_resuming_with_a_plain_shuffled_loader_names_the_resumable_one(tmp_path: Path, caplog: Any) -> None:
    train, val = loaders()
    plain = torch.utils.data.DataLoader(train.dataset, batch_size=8, shuffle=True)
    model = Shuffled()
    model.crash_at = 4
    with pytest.raises(RuntimeError, match="killed"):
        trainer(tmp_path, [LadleCheckpoint(tmp_path / "run", every_steps=2)], num_sanity_val_steps=0).fit(
            model, plain, val
        )
    callback = LadleCheckpoint(tmp_path / "run", every_steps=2)
    with caplog.at_level(logging.WARNING, logger="ladle"):
        trainer(tmp_path, [callback], max_epochs=1, num_sanity_val_steps=0).fit(
            Shuffled(), plain, val, ckpt_path=callback.resume_path()
        )
    assert "ladle.ResumableDataLoader" in caplog.text


def test_resumed_triggers_remember_the_best_so_far(tmp_path: Path) -> None:
    scores = [3.0, 1.0, 2.0, 0.5]
    fit(
        tmp_path,
        LadleCheckpoint(tmp_path / "run", monitor="score", on_improvement=True),
        Regressor(scores=scores),
    )
    second = LadleCheckpoint(tmp_path / "run", monitor="score", on_improvement=True)
    fit(tmp_path, second, Regressor(scores=scores), ckpt_path=second.resume_path(), max_epochs=4)
    assert [c.epoch for c in Run(tmp_path / "run").checkpoints()] == [0, 1, 3]


def test_resuming_an_older_checkpoint_keeps_it_and_names_new_saves_apart(tmp_path: Path) -> None:
    fit(tmp_path, LadleCheckpoint(tmp_path / "run"), max_epochs=3)
    second = LadleCheckpoint(tmp_path / "run", keep=Keep(last=1))
    fit(tmp_path, second, ckpt_path=second.resume_path(STEPS_PER_EPOCH), max_epochs=2)
    names = [c.name for c in Run(tmp_path / "run").checkpoints()]
    assert names == ["step-000000008", "step-000000016-1"]  # the resumed-from one survives retention


def test_resume_path_skips_a_damaged_latest_checkpoint(tmp_path: Path, caplog: Any) -> None:
    callback = LadleCheckpoint(tmp_path / "run")
    fit(tmp_path, callback)
    older, newest = Run(tmp_path / "run").checkpoints()
    with open(newest.file(LIGHTNING_FILE), "r+b") as handle:
        handle.truncate(100)
    with caplog.at_level(logging.WARNING, logger="ladle"):
        assert callback.resume_path() == older.file(LIGHTNING_FILE)
    assert "trying the checkpoint before it" in caplog.text


def test_best_model_path_serves_ckpt_path_best(tmp_path: Path) -> None:
    callback = LadleCheckpoint(tmp_path / "run", monitor="score")
    tr, model = fit(tmp_path, callback, Regressor(scores=[3.0, 1.0, 2.0]), max_epochs=3)
    best = Run(tmp_path / "run").checkpoints()[1]
    assert callback.best_model_path == best.file(LIGHTNING_FILE)
    assert callback.best_model_score == 1.0
    tr.validate(model, loaders()[1], ckpt_path="best", verbose=False)
    assert tr.ckpt_path == best.file(LIGHTNING_FILE)


# -- soups ------------------------------------------------------------------------------


def test_soup_at_fit_end_is_committed_and_loaded_into_the_module(tmp_path: Path) -> None:
    callback = LadleCheckpoint(tmp_path / "run", soup="last:3", load_soup=True)
    _, model = fit(tmp_path, callback, max_epochs=4)
    run = Run(tmp_path / "run")
    members = [load_file(c.file("model.safetensors")) for c in run.checkpoints(kind="train")[-3:]]
    expected = {k: sum(m[k] for m in members) / 3 for k in members[0]}
    torch.testing.assert_close(state_of(model), expected)
    (soup,) = run.checkpoints(kind="soup")
    assert soup.pinned and soup.name == "soup-last-3-000000032"
    assert callback.soup_result is not None and len(callback.soup_result.members) == 3


def test_soup_to_a_file_leaves_the_module_as_trained(tmp_path: Path) -> None:
    output = tmp_path / "soup.safetensors"
    callback = LadleCheckpoint(tmp_path / "run", soup="top:2:val_loss:min", soup_output=output)
    _, model = fit(tmp_path, callback, max_epochs=3)
    latest = Run(tmp_path / "run").latest()
    assert latest is not None
    assert_same(state_of(model), load_file(latest.file("model.safetensors")))
    Regressor().load_state_dict(load_file(output))
    provenance = json.loads((tmp_path / "soup.safetensors.json").read_text())
    assert provenance["recipe"] == "top:2:val_loss:min" and len(provenance["members"]) == 2


def test_greedy_soup_scores_candidates_with_the_users_evaluate(tmp_path: Path) -> None:
    x, y = next(iter(loaders()[1]))
    scored: list[float] = []

    def evaluate(state: dict[str, torch.Tensor]) -> dict[str, float]:
        module = Regressor()
        module.load_state_dict(state)
        with torch.no_grad():
            scored.append(nn.functional.mse_loss(module.net(x), y).item())
        return {"val_loss": scored[-1]}

    callback = LadleCheckpoint(
        tmp_path / "run", soup="greedy:val_loss:min", soup_options={"evaluate": evaluate}, load_soup=True
    )
    fit(tmp_path, callback, max_epochs=3)
    result = callback.soup_result
    assert result is not None and len(result.greedy) == 3 and len(scored) >= 3
    assert result.score == min(s.soup_score for s in result.greedy if s.accepted)


def test_greedy_soup_without_evaluate_fails_before_training(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="evaluate"):
        LadleCheckpoint(tmp_path / "run", soup="greedy:val_loss:min")


def test_a_bad_recipe_fails_before_training(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="last"):
        LadleCheckpoint(tmp_path / "run", soup="last:zero")


def test_soup_options_are_checked_before_training(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="wieghts"):
        LadleCheckpoint(tmp_path / "run", soup="last:2", soup_options={"wieghts": "uniform"})


def test_load_soup_without_a_recipe_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="soup='last:5'"):
        LadleCheckpoint(tmp_path / "run", load_soup=True)


def test_keep_best_without_a_metric_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="metric"):
        LadleCheckpoint(tmp_path / "run", keep=Keep(best=2))


# -- plain Lightning runs ---------------------------------------------------------------


def test_ladle_avg_of_plain_lightning_ckpt_files_loads_into_the_module(tmp_path: Path) -> None:
    checkpoints = tmp_path / "checkpoints"
    saver = L.callbacks.ModelCheckpoint(dirpath=checkpoints, save_top_k=-1, every_n_epochs=1)
    tr = trainer(tmp_path, [saver], max_epochs=3)
    tr.fit(Regressor(), *loaders())
    files = sorted(checkpoints.glob("*.ckpt"))
    assert len(files) == 3
    states = [torch.load(f, weights_only=True)["state_dict"] for f in files]

    assert main(["avg", str(checkpoints), "-o", str(tmp_path / "avg.safetensors")]) == 0

    averaged = load_file(tmp_path / "avg.safetensors")
    torch.testing.assert_close(averaged, {k: sum(s[k] for s in states) / 3 for k in states[0]})
    module = Regressor()
    module.load_state_dict(averaged)  # keys keep the LightningModule's attribute prefix ("net.")


def test_ladle_avg_counts_last_ckpt_of_save_last_once(tmp_path: Path, caplog: Any) -> None:
    checkpoints = tmp_path / "checkpoints"
    saver = L.callbacks.ModelCheckpoint(dirpath=checkpoints, save_top_k=-1, every_n_epochs=1, save_last=True)
    tr = trainer(tmp_path, [saver], max_epochs=3)
    tr.fit(Regressor(), *loaders())
    files = sorted(checkpoints.glob("epoch=*.ckpt"))
    assert len(files) == 3 and (checkpoints / "last.ckpt").is_file()
    states = [torch.load(f, weights_only=True)["state_dict"] for f in files]

    with caplog.at_level(logging.INFO, logger="ladle"):
        assert main(["avg", str(checkpoints), "-o", str(tmp_path / "avg.safetensors")]) == 0
    assert "last.ckpt holds the same weights as" in caplog.text

    averaged = load_file(tmp_path / "avg.safetensors")
    torch.testing.assert_close(averaged, {k: sum(s[k] for s in states) / 3 for k in states[0]})
    provenance = json.loads((tmp_path / "avg.safetensors.json").read_text())
    assert [Path(m["path"]).name for m in provenance["members"]] == [f.name for f in files]

    argv = ["avg", str(checkpoints), "-o", str(tmp_path / "all.safetensors"), "--keep-duplicates"]
    assert main(argv) == 0
    assert len(json.loads((tmp_path / "all.safetensors.json").read_text())["members"]) == 4


# -- both import names, missing packages ------------------------------------------------


def test_works_with_the_pytorch_lightning_trainer(tmp_path: Path) -> None:
    pl = pytest.importorskip("pytorch_lightning")

    class PlainRegressor(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Linear(4, 1)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            return nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.05)

    callback = LadleCheckpoint(tmp_path / "run", every_steps=4)
    tr = trainer(tmp_path, [callback], module=pl, max_epochs=1)
    tr.fit(PlainRegressor(), loaders()[0])
    assert tr.checkpoint_callback is callback
    assert [c.step for c in Run(tmp_path / "run").checkpoints()] == [4, 8]


def test_missing_lightning_names_the_extra_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("lightning", "lightning.pytorch", "pytorch_lightning"):
        monkeypatch.setitem(sys.modules, name, None)  # None in sys.modules: "not installed"
    monkeypatch.delitem(sys.modules, "ladle.integrations.lightning")
    with pytest.raises(MissingDependency, match=r"pip install 'ladle\[lightning\]'"):
        importlib.import_module("ladle.integrations.lightning")


@pytest.mark.slow
def test_importing_ladle_imports_no_training_framework() -> None:
    code = (
        "import sys, ladle, ladle.averaging.soups, ladle.averaging.engine; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('lightning', 'pytorch_lightning', 'transformers')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
