"""ladle.soup: choosing a run's checkpoints and averaging them (recipes themselves: test_recipes.py)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ladle import RunningSoup, soup
from ladle.averaging.members import member_from_source
from ladle.averaging.plan import AverageOptions, build_plan
from ladle.averaging.provenance import read_provenance
from ladle.averaging.running_average import RunningAverage
from ladle.errors import ConfigError, EmptySelection, OutputExists
from ladle.formats import DictSource
from ladle.store.run import Run

# -- soups of real runs -------------------------------------------------------------------------------

VALUES = [1.0, 2.0, 3.0, 4.0, 5.0]
LOSSES = [0.5, 0.3, 0.4, 0.2, 0.6]


def _make_run(path: Path, values: list[float] = VALUES, *, ema_from: int = 1) -> Run:
    run = Run(path, create=True).acquire()
    for i, (value, loss) in enumerate(zip(values, LOSSES, strict=False), start=1):
        pending = run.begin(f"step-{i * 100:09d}")
        weights = {"weight": torch.tensor([[value]]), "count": torch.tensor(i)}
        pending.write("model.safetensors", lambda p, w=weights: save_file(w, p))
        if i >= ema_from:
            ema = {"weight": torch.tensor([[value * 10]]), "count": torch.tensor(i)}
            pending.write("ema.safetensors", lambda p, w=ema: save_file(w, p))
        pending.commit(
            step=i * 100,
            epoch=i,
            metrics={"val_loss": loss, "acc": 1 - loss},
            monitor={"metric": "val_loss", "mode": "min"},
        )
    run.release()
    return Run(path)


@pytest.fixture
def run(tmp_path: Path) -> Run:
    return _make_run(tmp_path / "run")


def test_last_k_in_memory(run: Run) -> None:
    result = soup(run, "last:2")
    assert result.state_dict is not None
    assert result.state_dict["weight"].tolist() == [[4.5]]
    assert result.state_dict["count"].item() == 5
    assert [m.name for m in result.members] == ["step-000000400", "step-000000500"]
    assert result.weights == [0.5, 0.5]


def test_top_k_uses_the_runs_monitor(run: Run) -> None:
    result = soup(run.path, "top:2")
    assert result.recipe == "top:2:val_loss:min"
    assert [m.step for m in result.members] == [200, 400]
    assert result.state_dict is not None and result.state_dict["weight"].tolist() == [[3.0]]


def test_window_narrows_a_recipe(run: Run) -> None:
    result = soup(run, "uniform", window="epoch:2-3")
    assert result.state_dict is not None and result.state_dict["weight"].tolist() == [[2.5]]


def test_weights_apply_to_a_recipe(run: Run) -> None:
    result = soup(run, "last:2", weights="1,3")
    assert result.state_dict is not None and result.state_dict["weight"].tolist() == [[4.75]]
    recency = soup(run, "last:2", weights="recency:100")
    assert recency.weights == pytest.approx([1 / 3, 2 / 3])


def test_ema_weights_with_key(run: Run) -> None:
    result = soup(run, "last:2", key="ema")
    assert result.state_dict is not None and result.state_dict["weight"].tolist() == [[45.0]]


def test_checkpoints_without_the_asked_weights_are_left_out(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run = _make_run(tmp_path / "run", ema_from=4)
    with caplog.at_level(logging.WARNING, logger="ladle"):
        result = soup(run, "uniform", key="ema")
    assert [m.step for m in result.members] == [400, 500]
    assert "3 of 5 checkpoints have no ema.safetensors; leaving them out" in caplog.text


def test_output_file_has_the_recipe_and_run_checksums(run: Run, tmp_path: Path) -> None:
    out = tmp_path / "soup.safetensors"
    result = soup(run, "last:3", output=out)
    assert result.path == str(out)
    assert result.state_dict is None
    assert load_file(str(out))["weight"].tolist() == [[4.0]]
    record = read_provenance(out)
    assert record is not None and record["recipe"] == "last:3"
    assert record["run"] == run.path
    for entry, info in zip(record["members"], result.members, strict=True):
        assert entry["sha256"] == info.files["model.safetensors"].sha256
        assert (entry["name"], entry["step"], entry["epoch"]) == (info.name, info.step, info.epoch)


def test_into_run_commits_a_pinned_soup_checkpoint(run: Run) -> None:
    result = soup(run, "top:2:val_loss:min", into_run=True)
    info = result.checkpoint
    assert info is not None
    assert info.name == "soup-top-2-val_loss-min-000000400"
    assert (info.kind, info.pinned, info.step, info.epoch) == ("soup", True, 400, 4)
    reopened = Run(run.path)
    assert reopened.get(info.name).extra["soup"]["recipe"] == "top:2:val_loss:min"
    assert load_file(info.file("model.safetensors"))["weight"].tolist() == [[3.0]]
    # soups are not candidates of later soups
    assert [m.step for m in soup(reopened, "uniform").members] == [100, 200, 300, 400, 500]
    with pytest.raises(ConfigError, match="already exists; choose another name"):
        soup(reopened, "top:2:val_loss:min", into_run=True)


def test_into_run_and_output_together(run: Run, tmp_path: Path) -> None:
    result = soup(run, "last:2", output=tmp_path / "s.pt", into_run=True, name="final-soup")
    assert result.checkpoint is not None and result.checkpoint.name == "final-soup"
    assert load_file(result.checkpoint.file("model.safetensors"))["weight"].tolist() == [[4.5]]
    assert torch.load(tmp_path / "s.pt", weights_only=True)["weight"].tolist() == [[4.5]]


def test_an_empty_selection_is_an_error(run: Run) -> None:
    with pytest.raises(EmptySelection, match=r"recipe last:2@epoch:8-9 selects none of the 5 checkpoints"):
        soup(run, "last:2", window="epoch:8-9")


def test_output_is_checked_before_reading(run: Run, tmp_path: Path) -> None:
    (tmp_path / "s.safetensors").write_bytes(b"x")
    with pytest.raises(OutputExists, match="already exists"):
        soup(run, "last:2", output=tmp_path / "s.safetensors")


# -- greedy --------------------------------------------------------------------------------------------


def _distance_to(target: float):  # type: ignore[no-untyped-def]
    def evaluate(state: dict[str, torch.Tensor]) -> dict[str, float]:
        return {"score": -abs(float(state["weight"].item()) - target)}

    return evaluate


def test_greedy_adds_candidates_best_first_while_the_score_holds(run: Run) -> None:
    result = soup(run, "greedy:score:max", evaluate=_distance_to(2.6))
    steps = [(s.name[-3:], s.accepted, s.size) for s in result.greedy]
    # own scores: 3 -> -0.4, 2 -> -0.6, 4 -> -1.4, 1 -> -1.6, 5 -> -2.4
    assert steps == [
        ("300", True, 1),
        ("200", True, 2),
        ("400", False, 2),
        ("100", False, 2),
        ("500", False, 2),
    ]
    assert [s.soup_score for s in result.greedy] == pytest.approx([-0.4, -0.1, -0.4, -0.6, -(10 / 3 - 2.6)])
    assert result.score == pytest.approx(-0.1)
    assert result.state_dict is not None and result.state_dict["weight"].tolist() == [[2.5]]
    assert result.state_dict["count"].item() == 3  # newest of the accepted members
    assert [m.step for m in result.members] == [200, 300]
    assert result.score >= max(s.score for s in result.greedy)


def test_greedy_reads_each_candidate_at_most_twice(run: Run, monkeypatch: pytest.MonkeyPatch) -> None:
    loads: list[str] = []
    original = RunningAverage.load

    def counting(member, plan):  # type: ignore[no-untyped-def]
        loads.append(member.label)
        return original(member, plan)

    monkeypatch.setattr(RunningAverage, "load", staticmethod(counting))
    soup(run, "greedy:score:max", evaluate=_distance_to(2.6))
    assert len(loads) == 10
    assert all(loads.count(label) == 2 for label in set(loads))


def test_greedy_through_a_model_factory(run: Run) -> None:
    seen: list[float] = []

    class Counted(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(1, 1, bias=False)
            self.register_buffer("count", torch.tensor(0))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(x)

    def evaluate(model: nn.Module) -> float:
        value = float(model(torch.ones(1, 1)).item())
        seen.append(value)
        return -abs(value - 4.2)

    result = soup(run, "greedy:score:max", evaluate=evaluate, model=_RemapFactory(Counted))
    assert result.state_dict is not None and result.state_dict["weight"].tolist() == [[4.0]]
    assert seen[:5] == [1.0, 2.0, 3.0, 4.0, 5.0]


class _RemapFactory:
    """Builds a model whose state dict keys are those of the run ('weight', 'count')."""

    def __init__(self, cls: type[nn.Module]) -> None:
        self.cls = cls

    def __call__(self) -> nn.Module:
        inner = self.cls()

        class Flat(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.weight = inner.lin.weight
                self.register_buffer("count", torch.tensor(0))

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return x @ self.weight.T

        return Flat()


def test_greedy_can_rank_by_recorded_metric(run: Run) -> None:
    result = soup(
        run,
        "greedy:acc:max",
        evaluate=lambda state: {"acc": -abs(float(state["weight"]) - 3.0)},
        rank="recorded",
    )
    # recorded acc order: 400 (0.8), 200 (0.7), 300, 100, 500
    assert result.greedy[0].name == "step-000000400"
    assert result.greedy[0].score == pytest.approx(0.8)


def test_greedy_needs_evaluate_and_uniform_weights(run: Run) -> None:
    with pytest.raises(
        ConfigError, match=r"recipe greedy:acc:max needs evaluate= \(--eval module:function\)"
    ):
        soup(run, "greedy:acc:max")
    with pytest.raises(ConfigError, match="greedy soups are uniform averages"):
        soup(run, "greedy:acc:max", evaluate=lambda s: 0.0, weights="1,2,3,4,5")


def test_greedy_evaluate_must_return_the_metric(run: Run) -> None:
    with pytest.raises(ConfigError, match=r"evaluate returned loss but the recipe needs 'acc'"):
        soup(run, "greedy:acc:max", evaluate=lambda s: {"loss": 1.0})


def test_greedy_records_its_steps(run: Run, tmp_path: Path) -> None:
    soup(run, "greedy:score:max", evaluate=_distance_to(2.6), output=tmp_path / "g.safetensors")
    record = json.loads((tmp_path / "g.safetensors.json").read_text())
    assert [s["accepted"] for s in record["greedy"]] == [True, True, False, False, False]
    assert record["score"] == {"score": pytest.approx(-0.1)}


def test_running_average_combines_integers_by_policy() -> None:
    members = [
        member_from_source(DictSource({"w": torch.tensor([1.0]), "n": torch.tensor([7, 8, 9])}, path="a")),
        member_from_source(DictSource({"w": torch.tensor([3.0]), "n": torch.tensor([2, 2, 2])}, path="b")),
    ]
    for policy, expected in (("floor-mean", [4, 5, 5]), ("newest", [2, 2, 2]), ("first", [7, 8, 9])):
        options = AverageOptions(int_policy=policy)
        plan = build_plan(members, options)
        running = RunningAverage(plan, options)
        running.add(RunningAverage.load(members[0], plan), (1, 0))
        state = running.state(RunningAverage.load(members[1], plan), (2, 1))
        assert state["n"].tolist() == expected
        assert state["w"].tolist() == [2.0]


# -- running soups -------------------------------------------------------------------------------------


def test_running_soup_follows_the_run(tmp_path: Path) -> None:
    out = tmp_path / "running.safetensors"
    running = RunningSoup("last:2", out)
    run = Run(tmp_path / "run", create=True).acquire()
    seen = []
    for i, value in enumerate([1.0, 3.0, 7.0], start=1):
        pending = run.begin(f"step-{i:09d}")
        pending.write("model.safetensors", lambda p, v=value: save_file({"w": torch.tensor([v])}, p))
        pending.commit(step=i)
        assert running.update(run) is not None
        seen.append(load_file(str(out))["w"].item())
        assert running.update(run) is None  # nothing changed
    run.release()
    assert seen == [1.0, 2.0, 5.0]


def test_running_soup_refuses_a_foreign_file_but_resumes_its_own(run: Run, tmp_path: Path) -> None:
    out = tmp_path / "s.safetensors"
    out.write_bytes(b"someone else's")
    with pytest.raises(OutputExists, match="is not a running soup of last:2"):
        RunningSoup("last:2", out).update(run)
    out.unlink()
    RunningSoup("last:2", out).update(run)
    assert RunningSoup("last:2", out).update(run) is not None  # a new session replaces its own soup
    with pytest.raises(OutputExists):
        RunningSoup("last:3", out).update(run)
    assert RunningSoup("last:3", out, force=True).update(run) is not None


def test_running_top_k_waits_for_the_metric(tmp_path: Path) -> None:
    run = Run(tmp_path / "run", create=True).acquire()
    pending = run.begin("step-000000001")
    pending.write("model.safetensors", lambda p: save_file({"w": torch.ones(1)}, p))
    pending.commit(step=1)
    assert RunningSoup("top:2", tmp_path / "s.safetensors").update(run) is None
    run.release()


# -- sharded weights in a run --------------------------------------------------------------------------


def _sharded_checkpoint(run: Run, name: str, step: int, state: dict[str, torch.Tensor]) -> None:
    """A Trainer-style folder with `model-0000x-of-00002.safetensors` + index, recorded in place."""
    folder = Path(run.path) / name
    folder.mkdir()
    keys = sorted(state)
    shards = {"model-00001-of-00002.safetensors": keys[:1], "model-00002-of-00002.safetensors": keys[1:]}
    for shard, names in shards.items():
        save_file({k: state[k] for k in names}, str(folder / shard))
    weight_map = {k: shard for shard, names in shards.items() for k in names}
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    run.adopt(name, step=step, epoch=0, metrics={})


def test_checkpoints_with_sharded_weights_are_candidates(tmp_path: Path) -> None:
    run = Run(tmp_path / "run", create=True).acquire()
    states = [{"a": torch.full((2,), v), "b": torch.full((3,), -v)} for v in (1.0, 3.0, 8.0)]
    for i, state in enumerate(states, start=1):
        _sharded_checkpoint(run, f"checkpoint-{2 * i}", 2 * i, state)
    run.release()
    out = tmp_path / "soup.safetensors"
    result = soup(Run(run.path), "last:2", output=out)
    assert [m.name for m in result.members] == ["checkpoint-4", "checkpoint-6"]
    soup_state = load_file(str(out))
    assert soup_state["a"].tolist() == [5.5, 5.5] and soup_state["b"].tolist() == [-5.5] * 3
    record = read_provenance(out)
    assert record is not None
    assert sorted(record["members"][0]["files"]) == [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
    ]


def test_running_soup_follows_a_run_with_sharded_weights(tmp_path: Path) -> None:
    out = tmp_path / "running.safetensors"
    running = RunningSoup("last:2", out)
    run = Run(tmp_path / "run", create=True).acquire()
    for i, value in enumerate([1.0, 3.0], start=1):
        _sharded_checkpoint(run, f"checkpoint-{i}", i, {"a": torch.tensor([value]), "b": torch.tensor([0.0])})
        assert running.update(run) is not None
        assert running.update(run) is None
    run.release()
    assert load_file(str(out))["a"].tolist() == [2.0]
