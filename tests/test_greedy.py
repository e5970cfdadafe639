"""Greedy soups: acceptance rules, per-step reasons, BatchNorm recalibration, scores of every recipe."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from ladle import CheckpointManager, Run, recalibrate_bn, soup
from ladle.averaging.greedy import HALVES, decide
from ladle.averaging.recipe_parsing import parse_recipe
from ladle.averaging.recipes import Accept, Greedy
from ladle.averaging.scoring import Evaluation, evaluation_of
from ladle.errors import ConfigError, EmptySelection
from ladle.metrics import Mode

# -- the acceptance rules, on evaluations made by hand ---------------------------------------------


def _ev(values: list[float]) -> Evaluation:
    tensor = torch.tensor(values, dtype=torch.float64)
    return Evaluation(score=float(tensor.mean()), values=tensor)


def _halves(n: int) -> list[torch.Tensor]:
    from ladle.averaging.greedy import _half_splits

    return _half_splits(n)


@pytest.mark.parametrize(
    ("rule", "tried", "accepted", "reason"),
    [
        (Accept.NO_WORSE, [1, 1, 0, 0], True, "accepted: tie at 0.5"),
        (Accept.BETTER, [1, 1, 0, 0], False, "rejected: tie at 0.5 (better needs an improvement)"),
        (Accept.HALVES, [1, 1, 0, 0], False, "rejected: tie at 0.5 (halves needs an improvement)"),
        (Accept.NO_WORSE, [1, 0, 0, 0], False, "rejected: worse, 0.5 -> 0.25"),
        (Accept.BETTER, [1, 1, 1, 0], True, "accepted: better, 0.5 -> 0.75"),
    ],
)
def test_each_rule_accepts_or_rejects_and_says_why(
    rule: Accept, tried: list[float], accepted: bool, reason: str
) -> None:
    current = _ev([1, 1, 0, 0])
    ok, why = decide(rule, Mode.MAX, _ev(tried), current, _halves(4))
    assert ok is accepted
    assert why.startswith(reason)


def test_halves_rejects_an_improvement_carried_by_one_example() -> None:
    n = 40
    current = _ev([0.5] * n)
    tried = _ev([0.5] * (n - 1) + [0.1])  # lower NLL on one example only
    ok, why = decide(Accept.HALVES, Mode.MIN, tried, current, _halves(n))
    assert not ok
    assert f"of {2 * HALVES} halves" in why


def test_halves_accepts_an_improvement_that_holds_everywhere() -> None:
    n = 40
    ok, why = decide(Accept.HALVES, Mode.MIN, _ev([0.4] * n), _ev([0.5] * n), _halves(n))
    assert ok
    assert f"better on all {2 * HALVES} halves" in why


def test_per_example_values_score_as_their_mean() -> None:
    evaluation = evaluation_of({"acc": torch.tensor([1.0, 0.0, 1.0, 1.0]), "loss": 0.3}, "acc")
    assert evaluation.score == 0.75
    assert evaluation.metrics == {"acc": 0.75, "loss": 0.3}
    assert evaluation.values is not None and evaluation.values.tolist() == [1.0, 0.0, 1.0, 1.0]


# -- recipes ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "accept"),
    [
        ("greedy:val_acc:max", Accept.NO_WORSE),
        ("greedy:val_acc:max:accept=better", Accept.BETTER),
        ("greedy:val_nll:min:accept=halves", Accept.HALVES),
    ],
)
def test_the_acceptance_rule_is_part_of_the_recipe_string(text: str, accept: Accept) -> None:
    recipe = parse_recipe(text)
    assert isinstance(recipe.select, Greedy)
    assert recipe.select.accept is accept
    assert str(recipe) == text


def test_an_unknown_acceptance_rule_is_refused_naming_the_choices() -> None:
    with pytest.raises(ConfigError, match=r"accept='maybe' is not known; use no-worse, better or halves"):
        parse_recipe("greedy:val_acc:max:accept=maybe")


# -- on a real run of a network with BatchNorm and dropout -----------------------------------------

FEATURES, CLASSES = 8, 3


def _model() -> nn.Module:
    return nn.Sequential(
        nn.Linear(FEATURES, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, CLASSES)
    )


def _data(seed: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, FEATURES, generator=generator)
    y = (x[:, 0] + x[:, 1] > 0).long() + (x[:, 2] > 1).long()
    return x, y


X_TRAIN, Y_TRAIN = _data(0, 256)
X_VAL, Y_VAL = _data(1, 64)
LOADER = [(X_TRAIN[i : i + 32], Y_TRAIN[i : i + 32]) for i in range(0, 256, 32)]


def _per_example(model: nn.Module) -> dict[str, torch.Tensor]:
    model.eval()
    log_probs = torch.log_softmax(model(X_VAL).double(), dim=1)
    return {
        "val_acc": (log_probs.argmax(1) == Y_VAL).double(),
        "val_nll": -log_probs.gather(1, Y_VAL[:, None]).squeeze(1),
    }


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    path = tmp_path_factory.mktemp("greedy") / "run"
    torch.manual_seed(0)
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with CheckpointManager(str(path), model=model, optimizer=optimizer) as manager:
        for epoch in range(6):
            model.train()
            for x, y in LOADER:
                loss = nn.functional.cross_entropy(model(x), y)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            with torch.no_grad():
                values = _per_example(model)
            metrics = {k: float(v.mean()) for k, v in values.items()}
            manager.epoch_end(epoch, metrics=metrics, step=8 * (epoch + 1))
    return Run(str(path))


def _scores(state: dict[str, torch.Tensor]) -> dict[str, float]:
    model = _model()
    model.load_state_dict(state)
    with torch.no_grad():
        return {k: float(v.mean()) for k, v in _per_example(model).items()}


def test_every_step_says_why_it_was_accepted_or_rejected(run: Run) -> None:
    result = soup(run, "greedy:val_nll:min:accept=better", evaluate=_per_example, model=_model)
    assert len(result.greedy) == 6
    assert result.greedy[0].reason.startswith("accepted: the best on its own")
    for step in result.greedy[1:]:
        assert step.reason.startswith("accepted: better" if step.accepted else "rejected:")
    assert result.provenance["greedy"][0]["reason"] == result.greedy[0].reason


def test_recalibrated_statistics_are_written_into_the_soup_and_score_as_recorded(
    run: Run, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    output = tmp_path / "soup.safetensors"
    with caplog.at_level(logging.WARNING, logger="ladle"):
        result = soup(
            run, "greedy:val_acc:max", output=output, evaluate=_per_example, model=_model, recalibrate=LOADER
        )
    assert len(result.members) > 1  # otherwise nothing was averaged or recalibrated
    written = load_file(str(output))
    # The file's statistics are those of the averaged weights recalibrated on the loader, not averages.
    model = _model()
    model.load_state_dict(written)
    torch.manual_seed(0)
    recalibrate_bn(model, LOADER)
    assert torch.allclose(model[1].running_mean, written["1.running_mean"])
    assert _scores(written)["val_acc"] == pytest.approx(result.score)
    assert result.provenance["batchnorm"]["recalibrated"] is True
    assert result.needs_bn_recalibration is False
    assert "BatchNorm" not in caplog.text


def test_without_recalibration_an_average_warns_and_says_so_on_the_result(
    run: Run, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="ladle"):
        result = soup(run, "last:3")
    assert result.needs_bn_recalibration is True
    assert "BatchNorm" in caplog.text


def test_a_single_checkpoint_keeps_its_own_statistics_and_no_warning(
    run: Run, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="ladle"):
        result = soup(run, "last:1", recalibrate=LOADER, model=_model)
    assert result.needs_bn_recalibration is False
    assert "BatchNorm" not in caplog.text
    assert result.state_dict is not None
    own = load_file(run.checkpoints()[-1].file("model.safetensors"))
    assert torch.equal(result.state_dict["1.running_var"], own["1.running_var"])


def test_halves_that_accepts_nothing_returns_the_best_checkpoint_exactly(run: Run) -> None:
    def constant(model: nn.Module) -> dict[str, torch.Tensor]:
        return {"val_acc": torch.ones(len(Y_VAL), dtype=torch.float64)}  # every soup ties

    result = soup(
        run, "greedy:val_acc:max:accept=halves", evaluate=constant, model=_model, recalibrate=LOADER
    )
    assert len(result.members) == 1
    assert not any(step.accepted for step in result.greedy[1:])
    assert result.state_dict is not None
    own = load_file(result.members[0].file("model.safetensors"))
    assert all(torch.equal(result.state_dict[k], own[k]) for k in own)


def test_halves_needs_per_example_values(run: Run) -> None:
    with pytest.raises(ConfigError, match=r"accept=halves needs per-example values"):
        soup(run, "greedy:val_acc:max:accept=halves", evaluate=lambda m: {"val_acc": 0.5}, model=_model)


def test_an_evaluate_returning_the_wrong_metric_fails_before_the_search(run: Run) -> None:
    calls = []

    def evaluate(model: nn.Module) -> dict[str, float]:
        calls.append(1)
        return {"val_accuracy": 0.5}

    with pytest.raises(ConfigError, match=r"evaluate returned val_accuracy but the recipe needs 'val_acc'"):
        soup(run, "greedy:val_acc:max", evaluate=evaluate, model=_model)
    assert len(calls) == 1
    calls.clear()
    with pytest.raises(ConfigError, match=r"needs 'val_acc'"):
        soup(run, "greedy:val_acc:max", evaluate=evaluate, model=_model, rank="recorded")
    assert len(calls) == 1


def test_a_plain_recipe_is_scored_when_evaluate_is_given(run: Run) -> None:
    result = soup(run, "top:3:val_nll:min", evaluate=_per_example, model=_model, recalibrate=LOADER)
    assert result.state_dict is not None
    assert result.metrics == pytest.approx(_scores(result.state_dict))
    assert result.provenance["metrics"] == result.metrics
    assert result.needs_bn_recalibration is False


def test_an_evaluate_returning_one_number_is_the_score(run: Run) -> None:
    result = soup(run, "last:2", evaluate=lambda model: 0.25, model=_model)
    assert result.score == 0.25


def test_recalibration_needs_a_model(run: Run) -> None:
    with pytest.raises(ConfigError, match=r"recalibrate= needs model="):
        soup(run, "last:2", recalibrate=LOADER)


def test_a_recipe_metric_no_checkpoint_recorded_is_named_with_those_recorded(run: Run) -> None:
    with pytest.raises(ConfigError, match=r"no checkpoint recorded 'val_los'; recorded: val_acc, val_nll"):
        soup(run, "top:5:val_los:min")
    with pytest.raises(ConfigError, match=r"no checkpoint recorded 'val_los'"):
        soup(run, "improved:val_acc:max,val_los:min")


def test_improved_leaves_the_warm_up_out_unless_a_window_is_given(run: Run) -> None:
    names = [c.name for c in run.checkpoints()]
    default = soup(run, "improved:val_acc:max,val_nll:min:over=previous:warmup=0.5")
    assert all(names.index(c.name) >= 3 for c in default.members)
    first = soup(run, "improved:val_nll:min:warmup=0")
    assert first.members[0].name == names[0]  # its first value always "improves"
    windowed = soup(run, "improved:val_nll:min@epoch:0-5")
    assert windowed.members[0].name == names[0]


def test_a_warm_up_that_swallows_every_improvement_says_so(tmp_path: Path) -> None:
    path = tmp_path / "run"
    model = nn.Linear(2, 1)
    with CheckpointManager(str(path), model=model) as manager:
        for epoch, loss in enumerate([0.5, 0.9, 0.9, 0.9]):
            manager.epoch_end(epoch, metrics={"loss": loss}, step=epoch + 1)
    with pytest.raises(
        EmptySelection, match=r"every checkpoint that improved lies in the warm-up \(the first 1 of 4\)"
    ):
        soup(str(path), "improved:loss:min:over=best:warmup=0.25")


USER_CODE = """
import torch
from torch import nn


def build():
    return nn.Sequential(
        nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 3)
    )


def batches():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(256, 8, generator=generator)
    return [x[i : i + 32] for i in range(0, 256, 32)]
"""


def test_the_command_line_recalibrates_through_a_user_module(run: Run, tmp_path: Path) -> None:
    from ladle.cli.main import main

    user = tmp_path / "user.py"
    user.write_text(USER_CODE, encoding="utf-8")
    out = tmp_path / "soup.safetensors"
    argv = ["soup", run.path, "-o", str(out), "--recipe", "last:3"]
    assert main([*argv, "--model", f"{user}:build", "--recalibrate", f"{user}:batches"]) == 0
    written = load_file(str(out))
    plain = soup(run, "last:3").state_dict
    assert plain is not None
    assert not torch.allclose(written["1.running_var"], plain["1.running_var"])
    from ladle import read_provenance

    assert read_provenance(str(out))["batchnorm"]["recalibrated"] is True
