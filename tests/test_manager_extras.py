"""The manager with an EMA, a soup at the end of training, and a running soup."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

import ladle
from ladle.averaging.running_soup import RunningSoup
from tests.conftest import tiny_model, train_steps


def test_the_ema_is_saved_as_its_own_weights_file_and_resumes_exactly(tmp_path: Path) -> None:
    model = tiny_model().eval()  # no dropout: both copies below must see the same computation
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ema = ladle.EMA(model, decay=0.9)
    with ladle.CheckpointManager(tmp_path / "run", model=model, optimizer=optimizer, ema=ema) as manager:
        for step in range(1, 4):
            train_steps(model, optimizer, 1, seed=step)
            ema.update()
            manager.step(step)
        info = manager.save()
    assert info.extra["ema"] is True and "ema.safetensors" in info.files
    saved = load_file(info.file("ema.safetensors"))
    for key, value in ema.weights().items():
        assert torch.equal(saved[key], value)

    fresh = tiny_model(seed=9).eval()
    fresh_opt = torch.optim.SGD(fresh.parameters(), lr=0.1)
    fresh_ema = ladle.EMA(fresh, decay=0.9)
    with ladle.CheckpointManager(
        tmp_path / "run", model=fresh, optimizer=fresh_opt, ema=fresh_ema
    ) as manager:
        manager.resume()
    for step in range(4, 6):
        train_steps(model, optimizer, 1, seed=step)
        ema.update()
        train_steps(fresh, fresh_opt, 1, seed=step)
        fresh_ema.update()
    for key, value in ema.weights().items():
        assert torch.equal(fresh_ema.weights()[key], value), key


def test_restore_best_restores_the_ema_of_the_best_checkpoint_too(tmp_path: Path) -> None:
    model = tiny_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ema = ladle.EMA(model, decay=0.5)
    with ladle.CheckpointManager(
        tmp_path / "run", model=model, optimizer=optimizer, ema=ema, monitor="loss", every_steps=1
    ) as manager:
        best_weights = best_ema = None
        for step, loss in enumerate([3.0, 1.0, 2.0], start=1):
            train_steps(model, optimizer, 1, seed=step)
            ema.update()
            if loss == 1.0:
                best_weights = {k: v.clone() for k, v in model.state_dict().items()}
                best_ema = ema.weights()
            manager.step(step, metrics={"loss": loss})
        assert manager.restore_best().step == 2
    torch.testing.assert_close(model.state_dict(), best_weights, rtol=0, atol=0)
    torch.testing.assert_close(ema.weights(), best_ema, rtol=0, atol=0)


def test_manager_soup_averages_the_last_checkpoints(tmp_path: Path) -> None:
    model = tiny_model()
    with ladle.CheckpointManager(tmp_path / "run", model=model) as manager:
        for step in range(1, 4):
            with torch.no_grad():
                model[0].weight.fill_(float(step))
            manager.save(step=step)
        result = manager.soup("last:2", output=tmp_path / "soup.safetensors")
    soup = load_file(tmp_path / "soup.safetensors")
    assert torch.equal(soup["0.weight"], torch.full_like(soup["0.weight"], 2.5))
    assert [m.step for m in result.members] == [2, 3]


def test_manager_soup_into_the_run_it_is_writing(tmp_path: Path) -> None:
    model = tiny_model()
    with ladle.CheckpointManager(tmp_path / "run", model=model, keep=ladle.Keep(last=1)) as manager:
        for step in range(1, 4):
            manager.save(step=step)
        manager.soup("uniform", into_run=True, name="soup-final")
        manager.save(step=4)
        names = [c.name for c in manager.run.checkpoints()]
    assert "soup-final" in names  # retention never touches soups


def test_a_running_soup_is_kept_up_to_date_after_each_save(tmp_path: Path) -> None:
    model = tiny_model()
    out = tmp_path / "running.safetensors"
    with ladle.CheckpointManager(
        tmp_path / "run", model=model, running_soup=RunningSoup("last:2", out)
    ) as manager:
        for step in range(1, 5):
            with torch.no_grad():
                model[0].weight.fill_(float(step))
            manager.save(step=step)
            soup = load_file(out)
            expected = (step + max(step - 1, 1)) / 2 if step > 1 else 1.0
            assert torch.equal(soup["0.weight"], torch.full_like(soup["0.weight"], expected)), step
