"""ladle.EMA: the exponential moving average of a model's weights."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from ladle import EMA, ConfigError, EMAConfig, StateMismatch


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))


def _fake_step(model: nn.Module, step: int) -> None:
    """Deterministic 'training': weights depend only on the step, so two runs can agree."""
    gen = torch.Generator().manual_seed(1000 + step)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen), alpha=0.1)
    model.train()
    model(torch.randn(16, 4, generator=gen))  # moves BatchNorm running stats and counter


def test_update_matches_a_float64_reference_computed_by_hand() -> None:
    model = _net()
    ema = EMA(model, decay=0.9)
    reference = {k: v.detach().double().clone() for k, v in model.named_parameters()}
    for step in range(1, 26):
        _fake_step(model, step)
        ema.update()
        for name, p in model.named_parameters():
            reference[name] = 0.9 * reference[name] + 0.1 * p.detach().double()
    weights = ema.weights()
    for name, expected in reference.items():
        torch.testing.assert_close(weights[name].double(), expected, rtol=1e-5, atol=1e-6)


def test_float64_copy_of_a_float32_model_matches_the_reference_closely() -> None:
    model = _net()
    ema = EMA(model, decay=0.95, dtype=torch.float64)
    reference = {k: v.detach().double().clone() for k, v in model.named_parameters()}
    for step in range(1, 11):
        _fake_step(model, step)
        ema.update()
        for name, p in model.named_parameters():
            reference[name] = 0.95 * reference[name] + 0.05 * p.detach().double()
    for name, expected in reference.items():
        assert ema.weights()[name].dtype == torch.float64
        torch.testing.assert_close(ema.weights()[name], expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    ("warmup", "n", "expected"),
    [
        ("none", 0, 0.999),
        ("ratio", 0, 0.1),
        ("ratio", 1, 2 / 11),
        ("ratio", 10_000, 0.999),
        ("power", 0, 0.0),
        ("power", 7, 1 - 8 ** (-2 / 3)),
        ("power", 10**9, 0.999),
    ],
)
def test_warmup_schedule_gives_the_documented_decay(warmup: str, n: int, expected: float) -> None:
    assert EMAConfig(decay=0.999, warmup=warmup).decay_at(n) == pytest.approx(expected)


def test_ratio_warmup_makes_the_first_update_mostly_the_new_weights() -> None:
    model = _net()
    initial = model[0].weight.detach().clone()
    ema = EMA(model, decay=0.999, warmup="ratio")
    _fake_step(model, 1)
    ema.update()
    expected = 0.1 * initial + 0.9 * model[0].weight.detach()
    torch.testing.assert_close(ema.weights()["0.weight"], expected)
    assert ema.decay == pytest.approx(2 / 11)


def test_start_after_copies_the_raw_weights_until_then() -> None:
    model = _net()
    ema = EMA(model, decay=0.5, start_after=3)
    for step in range(1, 4):
        _fake_step(model, step)
        assert ema.update() is False
        assert torch.equal(ema.weights()["0.weight"], model[0].weight)
    assert ema.num_updates == 0
    before = ema.weights()["0.weight"].clone()
    _fake_step(model, 4)
    assert ema.update() is True
    expected = torch.lerp(before, model[0].weight.detach(), 0.5)
    assert torch.equal(ema.weights()["0.weight"], expected)


def test_every_n_steps_averages_only_on_those_steps() -> None:
    model = _net()
    ema = EMA(model, decay=0.5, every=3)
    results = []
    for step in range(1, 10):
        _fake_step(model, step)
        results.append(ema.update())
    assert results == [False, False, True] * 3
    assert ema.step == 9 and ema.num_updates == 3


def test_explicit_step_sets_the_counter() -> None:
    ema = EMA(_net(), decay=0.5, every=10)
    assert ema.update(step=20) is True
    assert ema.update(step=25) is False
    assert ema.step == 25


def test_integer_buffers_are_copied_and_float_buffers_follow_the_buffers_policy() -> None:
    model = _net()
    averaging = EMA(model, decay=0.9, buffers="average")
    copying = EMA(model, decay=0.9)
    start_mean = model[1].running_mean.clone()
    for step in range(1, 6):
        _fake_step(model, step)
        averaging.update()
        copying.update()
    bn = model[1]
    for ema in (averaging, copying):
        counter = ema.weights()["1.num_batches_tracked"]
        assert counter.dtype == torch.int64 and int(counter) == int(bn.num_batches_tracked) == 5
    assert torch.equal(copying.weights()["1.running_mean"], bn.running_mean)
    averaged = averaging.weights()["1.running_mean"]
    assert not torch.equal(averaged, bn.running_mean)
    assert not torch.equal(averaged, start_mean)


def test_one_foreach_lerp_per_device_dtype_group(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(8, 8) for _ in range(10)])
    model[3].double()
    ema = EMA(model, decay=0.9)
    calls: list[int] = []
    real = torch._foreach_lerp_

    def counting(shadows, sources, weight):  # type: ignore[no-untyped-def]
        calls.append(len(shadows))
        return real(shadows, sources, weight)

    monkeypatch.setattr(torch, "_foreach_lerp_", counting)
    ema.update()
    assert sorted(calls) == [2, 18]  # float64 layer, then the 18 float32 tensors


def test_resume_continues_the_average_bitwise(tmp_path: Path) -> None:
    straight_model = _net()
    straight = EMA(straight_model, decay=0.99, warmup="ratio", every=2, start_after=3)
    for step in range(1, 31):
        _fake_step(straight_model, step)
        straight.update()

    first_model = _net()
    first = EMA(first_model, decay=0.99, warmup="ratio", every=2, start_after=3)
    for step in range(1, 16):
        _fake_step(first_model, step)
        first.update()
    torch.save({"model": first_model.state_dict(), "ema": first.state_dict()}, tmp_path / "c.pt")

    saved = torch.load(tmp_path / "c.pt", weights_only=True)
    resumed_model = _net(seed=123)
    resumed_model.load_state_dict(saved["model"])
    resumed = EMA(resumed_model, decay=0.99, warmup="ratio", every=2, start_after=3)
    resumed.load_state_dict(saved["ema"])
    for step in range(16, 31):
        _fake_step(resumed_model, step)
        resumed.update()

    assert (resumed.step, resumed.num_updates) == (straight.step, straight.num_updates)
    for name, tensor in straight.weights().items():
        assert torch.equal(resumed.weights()[name], tensor), name


def test_applied_swaps_in_the_average_and_restores_the_raw_weights_bitwise() -> None:
    model = _net()
    ema = EMA(model, decay=0.9)
    for step in range(1, 6):
        _fake_step(model, step)
        ema.update()
    raw = {k: v.clone() for k, v in model.state_dict().items()}
    weight = model[0].weight
    with ema.applied(model) as inside:
        assert inside is model
        for name, tensor in ema.weights().items():
            assert torch.equal(model.state_dict()[name], tensor)
    assert model[0].weight is weight  # in place: an optimizer's references stay valid
    for name, tensor in raw.items():
        assert torch.equal(model.state_dict()[name], tensor), name


def test_applied_restores_the_raw_weights_when_the_block_raises() -> None:
    model = _net()
    ema = EMA(model, decay=0.9)
    _fake_step(model, 1)
    ema.update()
    raw = model[0].weight.detach().clone()
    with pytest.raises(RuntimeError, match="evaluation failed"), ema.applied():
        raise RuntimeError("evaluation failed")
    assert torch.equal(model[0].weight, raw)


def test_copy_to_loads_the_average_into_another_model() -> None:
    model = _net()
    ema = EMA(model, decay=0.9)
    _fake_step(model, 1)
    ema.update()
    other = _net(seed=5)
    ema.copy_to(other)
    for name, tensor in ema.weights().items():
        assert torch.equal(other.state_dict()[name], tensor)


def test_state_dict_is_keyed_like_the_bare_model_under_torch_compile() -> None:
    model = _net()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch._dynamo's own imports
        compiled = torch.compile(model)
    assert next(iter(compiled.state_dict())).startswith("_orig_mod.")
    sd = EMA(compiled, decay=0.9).state_dict()
    assert list(sd["weights"]) == list(model.state_dict())
    assert sd["decay"] == 0.9 and sd["step"] == 0 and sd["warmup"] == "none"


def test_state_dict_is_keyed_like_the_bare_model_under_data_parallel() -> None:
    model = _net()
    wrapped = nn.DataParallel(model)
    assert next(iter(wrapped.state_dict())).startswith("module.")
    assert list(EMA(wrapped).state_dict()["weights"]) == list(model.state_dict())


def test_load_state_dict_accepts_wrapper_prefixed_keys() -> None:
    model = _net()
    sd = EMA(model, decay=0.9).state_dict()
    sd["weights"] = {f"module.{k}": v + 1 for k, v in sd["weights"].items()}
    fresh = EMA(model, decay=0.9)
    fresh.load_state_dict(sd)
    torch.testing.assert_close(fresh.weights()["0.bias"], model[0].bias.detach() + 1)


def test_tied_weights_share_one_average() -> None:
    torch.manual_seed(0)
    embed, head = nn.Embedding(10, 4), nn.Linear(4, 10, bias=False)
    head.weight = embed.weight
    model = nn.ModuleDict({"embed": embed, "head": head})
    ema = EMA(model, decay=0.5)
    with torch.no_grad():
        embed.weight.add_(1.0)
    ema.update()
    weights = ema.weights()
    assert weights["embed.weight"] is weights["head.weight"]


def test_load_state_dict_names_missing_and_unexpected_keys() -> None:
    ema = EMA(_net(), decay=0.9)
    sd = ema.state_dict()
    sd["weights"] = dict(sd["weights"])
    del sd["weights"]["0.weight"]
    sd["weights"]["extra.weight"] = torch.zeros(1)
    with pytest.raises(StateMismatch, match=r"missing 1 \(0\.weight\); unexpected 1 \(extra"):
        ema.load_state_dict(sd)


def test_load_state_dict_names_a_shape_mismatch() -> None:
    ema = EMA(_net(), decay=0.9)
    sd = ema.state_dict()
    sd["weights"] = {**sd["weights"], "3.bias": torch.zeros(7)}
    with pytest.raises(StateMismatch, match=r"3\.bias has shape \(7,\)"):
        ema.load_state_dict(sd)


def test_load_state_dict_without_weights_says_what_to_pass() -> None:
    ema = EMA(_net())
    with pytest.raises(StateMismatch, match="no 'weights'"):
        ema.load_state_dict({"step": 3})


def test_load_state_dict_logs_changed_settings(caplog: pytest.LogCaptureFixture) -> None:
    sd = EMA(_net(), decay=0.9).state_dict()
    resumed = EMA(_net(), decay=0.99)
    with caplog.at_level(logging.WARNING, logger="ladle"):
        resumed.load_state_dict(sd)
    assert "decay was 0.9 in the checkpoint and is 0.99 now" in caplog.text


def test_replaced_parameters_are_followed() -> None:
    model = _net()
    ema = EMA(model, decay=0.0)
    fresh = {k: torch.full_like(v, 3.0) for k, v in model.state_dict().items()}
    model.load_state_dict(fresh, assign=True)
    ema.update()
    assert torch.equal(ema.weights()["0.weight"], torch.full((8, 4), 3.0))


def test_a_model_cast_after_creation_keeps_the_copy_dtype() -> None:
    model = _net()
    ema = EMA(model, decay=0.5)
    before = ema.weights()["0.weight"].clone()
    model.double()
    with torch.no_grad():
        model[0].weight.add_(0.25)
    ema.update()
    assert ema.weights()["0.weight"].dtype == torch.float32
    expected = torch.lerp(before, model[0].weight.detach().float(), 0.5)
    assert torch.equal(ema.weights()["0.weight"], expected)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"decay": 1.5}, r"decay=1\.5 is not allowed; use a number >= 0\.0 and <= 1\.0"),
        ({"decay": float("nan")}, "decay=nan"),
        ({"warmup": "cosine"}, r"warmup='cosine' is not allowed; use one of 'none', 'ratio'"),
        ({"buffers": "skip"}, "buffers='skip'"),
        ({"every": 0}, r"every=0 is not allowed; use an integer >= 1"),
        ({"start_after": -1}, "start_after=-1"),
        ({"power": 0}, r"power=0 is not allowed; use a number > 0\.0"),
        ({"device": "gpu7"}, "device='gpu7' is not a torch device"),
        ({"dtype": torch.int32}, "dtype=torch.int32 is not a floating torch dtype"),
    ],
)
def test_invalid_settings_name_the_field(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        EMA(_net(), **kwargs)


def test_a_non_module_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"needs a torch\.nn\.Module, got dict"):
        EMA({"w": torch.zeros(1)})  # type: ignore[arg-type]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cpu_copy_of_a_cuda_model_matches_an_on_device_average() -> None:
    model = _net().cuda()
    on_device = EMA(model, decay=0.9)
    offloaded = EMA(model, decay=0.9, device="cpu")
    for step in range(1, 6):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(step * 0.01)
        on_device.update()
        offloaded.update()
    for name, tensor in on_device.weights().items():
        assert offloaded.weights()[name].device.type == "cpu"
        torch.testing.assert_close(offloaded.weights()[name], tensor.cpu())


def _train(model: nn.Module, optimizer: torch.optim.Optimizer, ema: EMA, steps: range) -> None:
    for step in steps:
        gen = torch.Generator().manual_seed(step)
        loss = model(torch.randn(8, 4, generator=gen)).pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        ema.update()


def test_resume_through_the_manager_continues_the_average_bitwise(tmp_path: Path) -> None:
    from ladle import CheckpointManager
    from ladle.formats import load_source

    straight_model = _net()
    straight_opt = torch.optim.AdamW(straight_model.parameters(), lr=1e-2)
    straight = EMA(straight_model, decay=0.95, warmup="ratio")
    _train(straight_model, straight_opt, straight, range(1, 11))

    model = _net()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ema = EMA(model, decay=0.95, warmup="ratio")
    with CheckpointManager(str(tmp_path / "run"), model=model, optimizer=optimizer, ema=ema) as manager:
        _train(model, optimizer, ema, range(1, 6))
        info = manager.save(step=5, epoch=0)
    with load_source(info.path, key="ema") as source:  # the EMA is stored as its own weights file
        assert torch.equal(source.tensor("0.weight"), ema.weights()["0.weight"])

    model = _net(seed=7)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ema = EMA(model, decay=0.95, warmup="ratio")
    with CheckpointManager(str(tmp_path / "run"), model=model, optimizer=optimizer, ema=ema) as manager:
        point = manager.resume()
        assert point is not None and point.step == 5
        _train(model, optimizer, ema, range(6, 11))
    assert (ema.step, ema.num_updates) == (straight.step, straight.num_updates)
    for name, tensor in straight.weights().items():
        assert torch.equal(ema.weights()[name], tensor), name
