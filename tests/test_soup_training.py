"""A real training run (a small MLP on scikit-learn's bundled digits) saved by the manager, then souped."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from sklearn.datasets import load_digits
from torch import nn

from ladle import CheckpointManager, Run, soup

EPOCHS = 8


def _data() -> tuple[torch.Tensor, ...]:
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    gen = torch.Generator().manual_seed(0)
    order = torch.randperm(len(x), generator=gen)
    train, val, test = order[:1100], order[1100:1450], order[1450:]
    return x[train], y[train], x[val], y[val], x[test], y[test]


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Run, tuple[torch.Tensor, ...]]:
    data = _data()
    xtr, ytr, xval, yval, _, _ = data
    run_dir = tmp_path_factory.mktemp("digits") / "run"
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    gen = torch.Generator().manual_seed(1)
    step = 0
    with CheckpointManager(
        run_dir, model=model, optimizer=optimizer, monitor="val_acc", mode="max", every_epochs=1
    ) as manager:
        for epoch in range(EPOCHS):
            model.train()
            for batch in torch.randperm(len(xtr), generator=gen).split(64):
                loss = nn.functional.cross_entropy(model(xtr[batch]), ytr[batch])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                step += 1
            manager.epoch_end(epoch, step=step, metrics={"val_acc": _accuracy(model, xval, yval)})
    return Run(run_dir), data


def test_the_manager_saved_every_epoch(trained: tuple[Run, tuple[torch.Tensor, ...]]) -> None:
    run, _ = trained
    assert len(run.checkpoints(kind="train")) == EPOCHS


def test_uniform_soup_of_the_last_k_equals_a_plain_torch_average(
    trained: tuple[Run, tuple[torch.Tensor, ...]], tmp_path: Path
) -> None:
    run, _ = trained
    result = soup(run, "last:3", output=tmp_path / "soup.safetensors")
    files = [load_file(info.file("model.safetensors")) for info in run.checkpoints(kind="train")[-3:]]
    plain = {key: sum(f[key] for f in files) / 3 for key in files[0]}
    ours = load_file(str(tmp_path / "soup.safetensors"))
    assert [m.name for m in result.members] == [c.name for c in run.checkpoints(kind="train")[-3:]]
    assert sorted(ours) == sorted(plain)
    for key in plain:
        assert torch.equal(ours[key], plain[key]), key


def test_greedy_soup_is_never_worse_than_its_best_member(
    trained: tuple[Run, tuple[torch.Tensor, ...]],
) -> None:
    run, (_, _, _, _, xtest, ytest) = trained

    def held_out(model: nn.Module) -> dict[str, float]:
        return {"acc": _accuracy(model, xtest, ytest)}

    result = soup(run, "greedy:acc:max", evaluate=held_out, model=_model)
    best_member = max(step.score for step in result.greedy)
    assert result.score is not None and result.score >= best_member
    # the returned weights really score that
    model = _model()
    assert result.state_dict is not None
    model.load_state_dict(result.state_dict)
    assert _accuracy(model, xtest, ytest) == result.score


def test_training_continues_from_a_soup_committed_into_the_run(
    trained: tuple[Run, tuple[torch.Tensor, ...]],
) -> None:
    run, (xtr, ytr, *_rest) = trained
    result = soup(run, "last:2", into_run=True, name="soup-last-2")
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with CheckpointManager(
        run.path, model=model, optimizer=optimizer, monitor="val_acc", mode="max"
    ) as manager:
        manager.resume("soup-last-2")
        assert result.state_dict is not None
        for key, value in model.state_dict().items():
            assert torch.equal(value, result.state_dict[key]), key
        loss = nn.functional.cross_entropy(model(xtr[:64]), ytr[:64])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()  # fine-tuning goes on from the soup
