"""ladle.averaging.weights: uniform, explicit, softmax-over-a-metric and recency weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ladle import average
from ladle.averaging.weights import Explicit, Recency, Softmax, Uniform, parse_weights
from ladle.errors import ConfigError
from ladle.formats import DictSource


def _st(path: Path, tensors: dict[str, torch.Tensor], **metadata: str) -> Path:
    save_file(tensors, str(path), metadata=metadata or None)
    return path


def _files(tmp_path: Path, *values: list[float], dtype: torch.dtype = torch.float32) -> list[Path]:
    return [
        _st(tmp_path / f"c{i}.safetensors", {"w": torch.tensor(v, dtype=dtype)}) for i, v in enumerate(values)
    ]


def test_uniform_average_of_three_files(tmp_path: Path) -> None:
    files = _files(tmp_path, [1.0, 2.0], [3.0, 4.0], [5.0, 9.0])
    out = average(files)
    assert out["w"].tolist() == [3.0, 5.0]
    assert out["w"].dtype == torch.float32


def test_explicit_weights_are_normalized(tmp_path: Path) -> None:
    files = _files(tmp_path, [4.0], [8.0], [0.0])
    assert average(files, weights="2,1,1")["w"].tolist() == [4.0]
    assert average(files, weights=[0.5, 0.25, 0.25])["w"].tolist() == [4.0]


def test_softmax_weights_follow_the_metric(tmp_path: Path) -> None:
    a = _st(tmp_path / "a.pt.safetensors", {"w": torch.tensor([0.0])})
    b = _st(tmp_path / "b.safetensors", {"w": torch.tensor([1.0])})
    sources = [
        DictSource(load_file(str(p)), path=str(p), metadata={"metrics": {"acc": m}})
        for p, m in ((a, 1.0), (b, 0.0))
    ]
    # w_a : w_b = e^(1/0.5) : e^0, so the mean is 1 / (1 + e^2)
    out = average(sources, weights="softmax:acc:max:0.5")
    expected = 1.0 / (1.0 + torch.e**2)
    assert out["w"].item() == pytest.approx(expected, rel=1e-6)
    out_min = average(sources, weights="softmax:acc:min:0.5")
    assert out_min["w"].item() == pytest.approx(1.0 - expected, rel=1e-6)


def test_recency_weights_halve_per_half_life(tmp_path: Path) -> None:
    old = DictSource({"w": torch.tensor([0.0])}, path="old", metadata={"step": 100})
    new = DictSource({"w": torch.tensor([3.0])}, path="new", metadata={"step": 200})
    # weights 0.5 : 1 -> normalized 1/3, 2/3 -> mean 2
    assert average([old, new], weights="recency:100")["w"].item() == pytest.approx(2.0, rel=1e-7)


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("uniform", Uniform()),
        (None, Uniform()),
        ("1,2,3", Explicit(values=(1.0, 2.0, 3.0))),
        ([0.5, 0.5], Explicit(values=(0.5, 0.5))),
        ("softmax:val_loss:min", Softmax(metric="val_loss", mode="min", temperature=1.0)),  # type: ignore[arg-type]
        ("softmax:acc:max:0.1", Softmax(metric="acc", mode="max", temperature=0.1)),  # type: ignore[arg-type]
        ("recency:500", Recency(half_life=500.0)),
    ],
)
def test_weight_specs_parse(spec: object, expected: object) -> None:
    assert parse_weights(spec) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize("spec", ["uniform", "1,2,3", "softmax:acc:max:0.5", "recency:500"])
def test_weight_specs_round_trip(spec: str) -> None:
    assert str(parse_weights(spec)) == spec


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("1,-1", r"weight of .*b\.safetensors is -1; weights must not be negative"),
        ("0,0", "all weights are zero"),
        ("1,nan", r"weight of .*b\.safetensors is nan"),
        ("1,2,3", "3 numbers for 2 members"),
        ("softmax:acc", r"write softmax:METRIC:min\|max\[:TEMPERATURE\]"),
        ("softmax:acc:max:0", "temperature=0.0 must be a number above 0"),
        ("softmax:acc:up", "'up' is not a direction"),
        ("recency:-5", "half_life=-5.0 must be a number of steps above 0"),
        ("bogus", "weights 'bogus' not understood"),
    ],
)
def test_bad_weights_are_refused_with_a_reason(tmp_path: Path, spec: str, message: str) -> None:
    a = _st(tmp_path / "a.safetensors", {"w": torch.ones(1)})
    b = _st(tmp_path / "b.safetensors", {"w": torch.ones(1)})
    with pytest.raises(ConfigError, match=message):
        average([a, b], weights=spec)


def test_softmax_needs_the_metric_on_every_member(tmp_path: Path) -> None:
    files = _files(tmp_path, [1.0], [2.0])
    with pytest.raises(ConfigError, match=r"c0\.safetensors: no finite value of 'acc'"):
        average(files, weights="softmax:acc:max")


def test_recency_needs_steps(tmp_path: Path) -> None:
    files = _files(tmp_path, [1.0], [2.0])
    with pytest.raises(ConfigError, match=r"c0\.safetensors: no recorded step; recency weights need"):
        average(files, weights="recency:10")
