"""ladle.average: the streaming weighted mean, its dtype and integer rules, and its errors."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ladle import average, average_to_file
from ladle.averaging.engine import Averager
from ladle.averaging.int_policies import IntPolicy
from ladle.averaging.members import open_members
from ladle.averaging.plan import AverageOptions, build_plan
from ladle.errors import (
    ConfigError,
    IncompatibleMembers,
    NonFiniteValues,
    OutputExists,
)
from ladle.formats import DictSource, TensorInfo, TensorSource


def _st(path: Path, tensors: dict[str, torch.Tensor], **metadata: str) -> Path:
    save_file(tensors, str(path), metadata=metadata or None)
    return path


def _files(tmp_path: Path, *values: list[float], dtype: torch.dtype = torch.float32) -> list[Path]:
    return [
        _st(tmp_path / f"c{i}.safetensors", {"w": torch.tensor(v, dtype=dtype)}) for i, v in enumerate(values)
    ]


# -- integer policies ---------------------------------------------------------------------------------


def _int_files(tmp_path: Path) -> list[Path]:
    a = _st(tmp_path / "a.safetensors", {"w": torch.tensor([1.0]), "n": torch.tensor([7, 8, 9])})
    b = _st(tmp_path / "b.safetensors", {"w": torch.tensor([3.0]), "n": torch.tensor([2, 2, 2])})
    return [a, b]


@pytest.mark.parametrize(
    ("policy", "expected"),
    [("floor-mean", [4, 5, 5]), ("newest", [2, 2, 2]), ("first", [7, 8, 9])],
)
def test_integer_policies(tmp_path: Path, policy: str, expected: list[int]) -> None:
    out = average(_int_files(tmp_path), int_policy=policy)
    assert out["n"].tolist() == expected
    assert out["n"].dtype == torch.int64
    assert out["w"].tolist() == [2.0]


def test_error_policy_refuses_differing_integers(tmp_path: Path) -> None:
    with pytest.raises(
        IncompatibleMembers, match=r"'n': integer values differ between .*a\.safetensors and .*b\.safetensors"
    ):
        average(_int_files(tmp_path), int_policy="error")


def test_error_policy_accepts_equal_integers(tmp_path: Path) -> None:
    a = _st(tmp_path / "a.safetensors", {"n": torch.tensor([3])})
    b = _st(tmp_path / "b.safetensors", {"n": torch.tensor([3])})
    assert average([a, b], int_policy=IntPolicy.ERROR)["n"].tolist() == [3]


def test_newest_follows_recorded_steps_not_argument_order(tmp_path: Path) -> None:
    newer = DictSource({"n": torch.tensor(20)}, path="newer", metadata={"global_step": 200})
    older = DictSource({"n": torch.tensor(10)}, path="older", metadata={"global_step": 100})
    assert average([newer, older])["n"].item() == 20


def test_weighted_floor_mean_snaps_rounding_noise(tmp_path: Path) -> None:
    sources = [DictSource({"n": torch.tensor([10, 3])}, path=f"m{i}") for i in range(3)]
    # 0.1*10 + 0.2*10 + 0.7*10 is 9.999999999999998 in float64; the mean of equal values is 10
    assert average(sources, weights="0.1,0.2,0.7", int_policy="floor-mean")["n"].tolist() == [10, 3]
    mixed = [DictSource({"n": torch.tensor([4])}, path="a"), DictSource({"n": torch.tensor([8])}, path="b")]
    assert average(mixed, weights="0.75,0.25", int_policy="floor-mean")["n"].tolist() == [5]
    assert average(mixed, weights="0.6,0.4", int_policy="floor-mean")["n"].tolist() == [5]


def test_bool_tensors_are_never_averaged_as_floats() -> None:
    a = DictSource({"mask": torch.tensor([True, True, False])}, path="a")
    b = DictSource({"mask": torch.tensor([True, False, False])}, path="b")
    assert average([a, b], int_policy="floor-mean")["mask"].tolist() == [True, False, False]
    assert average([a, b], int_policy="newest")["mask"].tolist() == [True, False, False]
    assert average([a, b], int_policy="first")["mask"].dtype == torch.bool


def test_unknown_int_policy_is_refused() -> None:
    with pytest.raises(
        ConfigError, match="int_policy='mean' is not known; use one of newest, first, floor-mean, error"
    ):
        AverageOptions(int_policy="mean")


# -- dtypes -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_members_are_averaged_in_float32_and_rounded_once(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    members = [{"w": (torch.randn(4096, generator=gen) * 3).to(dtype)} for _ in range(7)]
    out = average(members)["w"]
    exact = (sum(m["w"].float() for m in members) / 7).to(dtype)
    naive = members[0]["w"].clone()
    for m in members[1:]:
        naive += m["w"]
    naive /= 7
    assert out.dtype == dtype
    assert torch.equal(out, exact)
    assert not torch.equal(out, naive)  # the test can tell the two apart


def test_dtype_option_casts_floats_only() -> None:
    members = [
        {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(3)},
        {"w": torch.tensor([2.0, 2.5]), "n": torch.tensor(5)},
    ]
    out = average(members, dtype="bf16")
    assert out["w"].dtype == torch.bfloat16
    assert out["w"].tolist() == [1.5, 2.25]
    assert out["n"].dtype == torch.int64


def test_float64_accumulator_on_request() -> None:
    members = [{"w": torch.tensor([16777216.0])}, {"w": torch.tensor([1.0])}, {"w": torch.tensor([1.0])}]
    assert average(members)["w"].item() == 5592405.5  # float32: 2**24 + 1 rounds to 2**24
    assert average(members, accumulate="float64")["w"].item() == 5592406.0


def test_float64_members_always_accumulate_in_float64() -> None:
    members = [
        {"w": torch.tensor([1e16 + 2], dtype=torch.float64)},
        {"w": torch.tensor([1e16], dtype=torch.float64)},
    ]
    out = average(members)["w"]
    assert out.dtype == torch.float64
    assert out.item() == 1e16 + 1


def test_mixed_float_dtypes_need_an_output_dtype() -> None:
    members = [{"w": torch.tensor([1.0])}, {"w": torch.tensor([3.0], dtype=torch.bfloat16)}]
    with pytest.raises(
        IncompatibleMembers, match=r"'w' is float32 in <state dict 1> but bfloat16 in <state dict 2>.*dtype="
    ):
        average(members)
    assert average(members, dtype="float32")["w"].tolist() == [2.0]


@pytest.mark.parametrize(
    ("option", "value"), [("dtype", "int8"), ("accumulate", "bf16"), ("dtype", "float128")]
)
def test_bad_dtype_options_are_refused(option: str, value: str) -> None:
    with pytest.raises(ConfigError, match=f"{option}="):
        average([{"w": torch.ones(1)}], **{option: value})  # type: ignore[arg-type]


# -- ties ---------------------------------------------------------------------------------------------


def _tied(path: Path, value: float) -> Path:
    emb = torch.full((3, 2), value)
    torch.save({"embed.weight": emb, "head.weight": emb, "head.bias": torch.full((3,), value)}, path)
    return path


def test_tied_tensors_stay_tied_in_memory(tmp_path: Path) -> None:
    out = average([_tied(tmp_path / "a.pt", 1.0), _tied(tmp_path / "b.pt", 3.0)])
    assert out["head.weight"] is out["embed.weight"]
    assert out["embed.weight"].tolist() == [[2.0, 2.0]] * 3


def test_tied_tensors_stay_tied_in_both_output_formats(tmp_path: Path) -> None:
    inputs = [_tied(tmp_path / "a.pt", 1.0), _tied(tmp_path / "b.pt", 3.0)]
    average_to_file(inputs, tmp_path / "out.pt")
    loaded = torch.load(tmp_path / "out.pt", weights_only=True)
    assert loaded["head.weight"].data_ptr() == loaded["embed.weight"].data_ptr()
    average_to_file(inputs, tmp_path / "out.safetensors")
    with safe_open(str(tmp_path / "out.safetensors"), "pt") as handle:
        assert json.loads(handle.metadata()["ladle.aliases"]) == {"head.weight": "embed.weight"}
    result = average([tmp_path / "out.safetensors"])
    assert result["head.weight"] is result["embed.weight"]


def test_a_tie_in_some_members_only_is_averaged_name_by_name(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tied = _tied(tmp_path / "a.pt", 1.0)
    untied = {
        "embed.weight": torch.full((3, 2), 3.0),
        "head.weight": torch.full((3, 2), 5.0),
        "head.bias": torch.zeros(3),
    }
    with caplog.at_level(logging.WARNING, logger="ladle"):
        out = average([tied, untied])
    assert "'head.weight' is tied to 'embed.weight' in some members only" in caplog.text
    assert out["embed.weight"][0].tolist() == [2.0, 2.0]
    assert out["head.weight"][0].tolist() == [3.0, 3.0]


# -- mismatches and bad values ------------------------------------------------------------------------


def test_key_mismatch_lists_every_file_and_key(tmp_path: Path) -> None:
    a = _st(tmp_path / "a.safetensors", {"x": torch.ones(1), "y": torch.ones(1)})
    b = _st(tmp_path / "b.safetensors", {"x": torch.ones(1)})
    c = _st(tmp_path / "c.safetensors", {"x": torch.ones(1), "y": torch.ones(1), "z": torch.ones(1)})
    message = (
        r"members disagree on keys \(compared with .*a\.safetensors\): .*b\.safetensors lacks 'y'; "
        r".*c\.safetensors has extra 'z'; pass intersect=True \(--intersect\) to average only the 1 common keys"
    )
    with pytest.raises(IncompatibleMembers, match=message):
        average([a, b, c])


def test_intersect_averages_only_the_common_keys(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    a = _st(tmp_path / "a.safetensors", {"x": torch.tensor([1.0]), "y": torch.ones(1)})
    b = _st(tmp_path / "b.safetensors", {"x": torch.tensor([3.0]), "z": torch.ones(1)})
    with caplog.at_level(logging.WARNING, logger="ladle"):
        out = average([a, b], intersect=True)
    assert out == {"x": torch.tensor([2.0])} or list(out) == ["x"]
    assert out["x"].tolist() == [2.0]
    assert "leaving out 'y', 'z'" in caplog.text


def test_prefix_difference_gets_a_hint(tmp_path: Path) -> None:
    a = _st(tmp_path / "a.safetensors", {"fc.w": torch.ones(1)})
    b = _st(tmp_path / "b.safetensors", {"module.fc.w": torch.ones(1)})
    with pytest.raises(
        IncompatibleMembers, match=r"the keys differ by the prefix 'module\.': pass strip_prefix"
    ):
        average([a, b])
    assert average([a, b], strip_prefix="module.")["fc.w"].tolist() == [1.0]


def test_shape_mismatch_names_key_and_files(tmp_path: Path) -> None:
    a = _st(tmp_path / "a.safetensors", {"fc.weight": torch.ones(10, 4)})
    b = _st(tmp_path / "b.safetensors", {"fc.weight": torch.ones(12, 4)})
    with pytest.raises(
        IncompatibleMembers,
        match=r"'fc\.weight' is \[10, 4\] in .*a\.safetensors but \[12, 4\] in .*b\.safetensors",
    ):
        average([a, b])


def test_integer_against_float_is_a_mismatch_even_with_a_dtype() -> None:
    with pytest.raises(
        IncompatibleMembers, match="'n' is int64 in <state dict 1> but float32 in <state dict 2>"
    ):
        average([{"n": torch.tensor(1)}, {"n": torch.tensor(1.0)}], dtype="float32")


def test_nothing_in_common_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(IncompatibleMembers, match="members share no keys"):
        average([{"a": torch.ones(1)}, {"b": torch.ones(1)}], intersect=True)


@pytest.mark.parametrize(("bad", "kind"), [(float("nan"), "NaN"), (float("inf"), "inf")])
def test_non_finite_member_is_named_with_file_and_key(tmp_path: Path, bad: float, kind: str) -> None:
    a = _st(tmp_path / "a.safetensors", {"x": torch.ones(3), "y": torch.ones(2)})
    b = _st(tmp_path / "b.safetensors", {"x": torch.ones(3), "y": torch.tensor([1.0, bad])})
    with pytest.raises(
        NonFiniteValues, match=rf"b\.safetensors: 'y' holds 1 non-finite value\(s\) \({kind}\)"
    ):
        average([a, b])


def test_overflow_into_a_narrow_output_dtype_is_an_error() -> None:
    with pytest.raises(NonFiniteValues, match="'w': the average overflows float16"):
        average([{"w": torch.tensor([1e6])}, {"w": torch.tensor([1e6])}], dtype="fp16")


def test_sum_overflow_asks_for_float64() -> None:
    huge = torch.tensor([3e38])
    with pytest.raises(NonFiniteValues, match="the weighted sum overflows; accumulate in float64"):
        average([{"w": huge}, {"w": huge}])
    assert average([{"w": huge}, {"w": huge}], accumulate="float64")["w"].item() == pytest.approx(3e38)


def test_scalars_and_empty_tensors() -> None:
    members = [
        {"s": torch.tensor(1.0), "e": torch.empty(0, 3)},
        {"s": torch.tensor(2.0), "e": torch.empty(0, 3)},
    ]
    out = average(members)
    assert out["s"].item() == 1.5
    assert out["e"].shape == (0, 3)


# -- files and provenance -----------------------------------------------------------------------------


def test_output_is_refused_before_any_work_without_force(tmp_path: Path) -> None:
    files = _files(tmp_path, [1.0], [3.0])
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"keep me")
    with pytest.raises(OutputExists, match=r"out\.safetensors: already exists; pass force=True \(--force\)"):
        average_to_file(files, out)
    assert out.read_bytes() == b"keep me"
    average_to_file(files, out, force=True)
    assert load_file(str(out))["w"].tolist() == [2.0]


def test_failure_midway_leaves_no_output(tmp_path: Path) -> None:
    a = _st(tmp_path / "a.safetensors", {"a": torch.ones(4), "b": torch.ones(2)})
    b = _st(tmp_path / "b.safetensors", {"a": torch.ones(4), "b": torch.tensor([1.0, float("nan")])})
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(NonFiniteValues):
        average_to_file([a, b], tmp_path / "out.safetensors")
    assert sorted(os.listdir(tmp_path)) == before


def test_torch_format_output(tmp_path: Path) -> None:
    files = _files(tmp_path, [1.0], [3.0])
    result = average_to_file(files, tmp_path / "out.bin", format="torch")
    assert torch.load(tmp_path / "out.bin", weights_only=True)["w"].tolist() == [2.0]
    assert Path(result.sidecar).name == "out.bin.json"


def test_batchnorm_statistics_trigger_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    bn = torch.nn.BatchNorm1d(3)
    with caplog.at_level(logging.WARNING, logger="ladle"):
        average([bn.state_dict(), bn.state_dict()])
    assert "BatchNorm running statistics (1 layers)" in caplog.text
    assert "ladle.recalibrate_bn" in caplog.text


class _Recorder(TensorSource):
    """A source that logs every read, to check the order of work."""

    format = "test"

    def __init__(self, name: str, tensors: dict[str, torch.Tensor], log: list[str]) -> None:
        super().__init__()
        self.path = name
        self._tensors = tensors
        self._log = log

    def keys(self) -> list[str]:
        return list(self._tensors)

    def info(self, key: str) -> TensorInfo:
        return TensorInfo(self._tensors[key].shape, self._tensors[key].dtype)

    def tensor(self, key: str) -> torch.Tensor:
        self._log.append(f"read {self.path}:{key}")
        return self._tensors[key]


def test_streaming_reads_one_key_from_every_member_before_the_next_key() -> None:
    log: list[str] = []
    tensors = {"a": torch.ones(2), "b": torch.ones(3), "c": torch.ones(1)}
    members = open_members([_Recorder(n, tensors, log) for n in ("m1", "m2", "m3")])
    options = AverageOptions()
    plan = build_plan(members, options)
    averager = Averager(members, [1 / 3] * 3, plan, options)
    for key, _ in averager.stream(list(plan.keys)):
        log.append(f"yield {key}")
    assert log == [
        "read m1:a", "read m2:a", "read m3:a", "yield a",
        "read m1:b", "read m2:b", "read m3:b", "yield b",
        "read m1:c", "read m2:c", "read m3:c", "yield c",
    ]  # fmt: skip
    # two accumulators (one being written, one computed), each as large as the largest tensor,
    # whatever the number of members
    assert averager.accumulator_bytes == 2 * 3 * 4


@pytest.fixture
def tiny_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    # `ladle.average` is the function; the module is in sys.modules.
    monkeypatch.setattr(sys.modules["ladle.averaging.engine"], "BLOCK", 4)


def test_blocks_add_up_to_the_whole_tensor(tiny_blocks: None, tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(0)
    values = [torch.randn(3, 7, generator=gen) for _ in range(3)]
    files = [_st(tmp_path / f"c{i}.safetensors", {"w": v}) for i, v in enumerate(values)]
    assert torch.equal(average(files)["w"], (values[0] + values[1] + values[2]) / 3)
    weighted = average(files, weights="0.5,0.25,0.25")["w"]
    torch.testing.assert_close(weighted, 0.5 * values[0] + 0.25 * values[1] + 0.25 * values[2])
    narrow = average(files, dtype="bf16")["w"]
    assert torch.equal(narrow, ((values[0] + values[1] + values[2]) / 3).to(torch.bfloat16))


def test_a_nan_in_a_late_block_is_found(tiny_blocks: None, tmp_path: Path) -> None:
    bad = torch.zeros(10)
    bad[9] = float("nan")
    a = _st(tmp_path / "a.safetensors", {"w": torch.zeros(10)})
    b = _st(tmp_path / "b.safetensors", {"w": bad})
    with pytest.raises(NonFiniteValues, match=r"b\.safetensors: 'w' holds 1 non-finite value\(s\) \(NaN\)"):
        average([a, b])


def test_the_engine_leaves_torch_threads_as_it_found_them(tmp_path: Path) -> None:
    before = torch.get_num_threads()
    average(_files(tmp_path, [1.0], [2.0]))
    assert torch.get_num_threads() == before


def test_the_mixed_dtype_hint_is_not_given_for_a_key_that_only_has_float_in_its_name() -> None:
    a = DictSource({"float_scale": torch.ones(2)}, path="a")
    b = DictSource({"float_scale": torch.ones(3)}, path="b")
    with pytest.raises(IncompatibleMembers) as caught:
        average([a, b])
    assert "'float_scale' is [2] in a but [3] in b" in str(caught.value)
    assert "--dtype" not in str(caught.value)


@pytest.mark.parametrize("policy", ["newest", "first", "floor-mean"])
def test_the_streaming_and_the_running_average_combine_integers_alike(policy: str) -> None:
    from ladle.averaging.running_average import RunningAverage

    members = open_members(
        [
            DictSource({"n": torch.tensor([7, 2]), "w": torch.ones(1)}, path="a", metadata={"step": 1}),
            DictSource({"n": torch.tensor([8, 2]), "w": torch.ones(1)}, path="b", metadata={"step": 3}),
            DictSource({"n": torch.tensor([10, 2]), "w": torch.ones(1)}, path="c", metadata={"step": 2}),
        ]
    )
    options = AverageOptions(int_policy=policy)
    plan = build_plan(members, options)
    running = RunningAverage(plan, options)
    for position, member in enumerate(members):
        assert member.step is not None
        running.add(RunningAverage.load(member, plan), (member.step, position))
    streamed = average(members, int_policy=policy)["n"]
    assert torch.equal(running.state()["n"], streamed)
    expected = {"newest": [8, 2], "first": [7, 2], "floor-mean": [8, 2]}[policy]
    assert streamed.tolist() == expected


def test_a_block_that_cannot_be_written_is_the_error_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The output is written block by block on a thread; the failure of a block is what the
    # caller hears, even when an empty tensor follows it.
    import errno

    from ladle.formats.write import SafetensorsWriter

    files = [
        _st(tmp_path / f"m{i}.safetensors", {"a": torch.randn(8), "z": torch.empty(0)}) for i in range(2)
    ]
    original = SafetensorsWriter.write_block

    def full_disk(self: SafetensorsWriter, key: str, *args: object, **kwargs: object) -> None:
        if key == "a":
            raise OSError(errno.ENOSPC, "No space left on device")
        original(self, key, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(SafetensorsWriter, "write_block", full_disk)
    with pytest.raises(OSError, match="No space left"):
        average_to_file(files, tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []
