"""ladle.formats: lazy readers for every checkpoint format, and the atomic writer."""

from __future__ import annotations

import fractions
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import ladle.formats.safetensors_io as st_io
from ladle.errors import CheckpointNotFound, CorruptCheckpoint, FormatError, OutputExists, UnsafeLoad
from ladle.formats import DictSource, TensorInfo, load_source, save_tensors
from ladle.store.run import Run

SD = {
    "linear.weight": torch.tensor([[1.0, 2.0], [3.0, 4.0]]),
    "linear.bias": torch.tensor([0.5, -0.5]),
    "bn.num_batches_tracked": torch.tensor(7),
}


def _equal(source, expected: dict[str, torch.Tensor]) -> None:
    assert sorted(source.keys()) == sorted(expected)
    for key, value in expected.items():
        got = source.tensor(key)
        assert got.dtype == value.dtype, key
        assert torch.equal(got, value), key


# -- safetensors -------------------------------------------------------------------------------


def test_safetensors_file_reads_keys_infos_tensors_and_metadata(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    save_file(SD, str(path), metadata={"note": "hi"})
    with load_source(path) as source:
        assert source.format == "safetensors"
        assert source.path == str(path)
        assert source.info("linear.weight") == (torch.Size([2, 2]), torch.float32)
        assert source.info("bn.num_batches_tracked") == TensorInfo(torch.Size([]), torch.int64)
        assert source.metadata == {"note": "hi"}
        _equal(source, SD)


def test_info_reads_no_tensor_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "w.safetensors"
    save_file(SD, str(path))

    def no_reads(*args: object) -> int:
        raise AssertionError("info() must not read tensor data")

    monkeypatch.setattr(st_io.os, "preadv", no_reads)
    with load_source(path) as source:
        assert source.info("linear.bias").shape == torch.Size([2])


def test_read_into_fills_the_callers_buffer(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    save_file(SD, str(path))
    scratch = torch.empty(64, dtype=torch.uint8)
    with load_source(path) as source:
        got = source.read_into("linear.weight", scratch)
    assert got.data_ptr() == scratch.data_ptr()
    assert torch.equal(got, SD["linear.weight"])


BIG = torch.arange(30_000, dtype=torch.float32).view(100, 300)


def _big_source(tmp_path: Path, kind: str):  # type: ignore[no-untyped-def]
    if kind == "safetensors":
        save_file({"big": BIG, "x": torch.ones(2)}, str(tmp_path / "w.safetensors"))
        return load_source(tmp_path / "w.safetensors")
    if kind == "torch":
        torch.save({"big": BIG, "x": torch.ones(2)}, tmp_path / "w.pt")
        return load_source(tmp_path / "w.pt")
    if kind == "sharded":
        folder = tmp_path / "hf"
        folder.mkdir()
        save_file({"x": torch.ones(2)}, str(folder / "model-00001-of-00002.safetensors"))
        save_file({"big": BIG}, str(folder / "model-00002-of-00002.safetensors"))
        index = {"x": "model-00001-of-00002.safetensors", "big": "model-00002-of-00002.safetensors"}
        (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": index}))
        return load_source(folder)
    if kind == "prefixed":
        torch.save({"module.big": BIG, "module.x": torch.ones(2)}, tmp_path / "w.pt")
        return load_source(tmp_path / "w.pt", strip_prefix="module.")
    return DictSource({"big": BIG, "x": torch.ones(2)})


@pytest.mark.parametrize("kind", ["safetensors", "torch", "sharded", "prefixed", "dict"])
def test_read_block_reads_a_flat_slice(tmp_path: Path, kind: str) -> None:
    scratch = torch.empty(1 << 12, dtype=torch.uint8)
    with _big_source(tmp_path, kind) as source:
        block = source.read_block("big", 29_000, 1_000, scratch)
        assert torch.equal(block, BIG.reshape(-1)[29_000:])
        if kind in ("safetensors", "sharded"):  # a view of the file mapped whole: no copy
            sizes = {p.stat().st_size for p in tmp_path.rglob("*.safetensors")}
            assert block.untyped_storage().nbytes() in sizes
        else:  # a view of the tensor (for a pickle, of torch's mapping of the file): no copy
            whole = source.tensor("big")
            assert block.untyped_storage().data_ptr() == whole.untyped_storage().data_ptr()
            del whole
        source.release_block("big", 29_000, 1_000)
        assert torch.equal(source.read_block("big", 0, 3, None), torch.tensor([0.0, 1.0, 2.0]))


def test_read_block_of_a_saved_view_follows_c_order(tmp_path: Path) -> None:
    torch.save({"t": BIG.t()}, tmp_path / "w.pt")
    with load_source(tmp_path / "w.pt") as source:
        assert torch.equal(source.read_block("t", 0, 5, None), BIG.t().reshape(-1)[:5])


def test_tensor_returns_memory_that_outlives_the_source(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    save_file(SD, str(path))
    with load_source(path) as source:
        kept = source.tensor("linear.weight")
    kept.add_(1)  # owned memory: writable, independent of the file
    assert kept.tolist() == [[2.0, 3.0], [4.0, 5.0]]
    assert load_file(str(path))["linear.weight"].tolist() == [[1.0, 2.0], [3.0, 4.0]]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64, torch.bool, torch.int8])
def test_safetensors_round_trips_every_common_dtype(tmp_path: Path, dtype: torch.dtype) -> None:
    value = torch.tensor([[1, 0, 3], [0, 5, 1]]).to(dtype)
    path = tmp_path / "w.safetensors"
    save_tensors({"x": value}, path)
    with load_source(path) as source:
        assert torch.equal(source.tensor("x"), value)
        assert source.tensor("x").dtype == dtype


def test_truncated_safetensors_file_is_a_format_error_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    save_file(SD, str(path))
    data = path.read_bytes()
    path.write_bytes(data[:-4])
    with pytest.raises(FormatError, match=r"w\.safetensors: tensor '.*' lies outside the file"):
        load_source(path)


def test_garbage_with_a_safetensors_name_is_a_format_error(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    path.write_bytes(b"\xff" * 64)
    with pytest.raises(FormatError, match=r"w\.safetensors: not a safetensors file"):
        load_source(path)


def test_key_selects_tensors_under_a_prefix_in_safetensors(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    save_file({"ema.a": torch.ones(2), "model.a": torch.zeros(2)}, str(path))
    with load_source(path, key="ema") as source:
        assert source.keys() == ["a"]
        assert torch.equal(source.tensor("a"), torch.ones(2))
    with pytest.raises(FormatError, match="no tensors under key 'nope'"):
        load_source(path, key="nope")


def test_unknown_suffix_is_sniffed_from_the_bytes(tmp_path: Path) -> None:
    st_path = tmp_path / "weights.data"
    save_file(SD, str(st_path))
    pt_path = tmp_path / "weights.raw"
    torch.save(SD, pt_path)
    with load_source(st_path) as a, load_source(pt_path) as b:
        assert (a.format, b.format) == ("safetensors", "torch")


def test_missing_path_is_checkpoint_not_found(tmp_path: Path) -> None:
    with pytest.raises(CheckpointNotFound, match=r"nope\.pt: no such file or directory"):
        load_source(tmp_path / "nope.pt")


def test_a_closed_source_refuses_reads(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    save_file(SD, str(path))
    source = load_source(path)
    source.close()
    with pytest.raises(FormatError, match="the source is closed"):
        source.tensor("linear.bias")


def test_unknown_key_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    save_file(SD, str(path))
    with load_source(path) as source, pytest.raises(FormatError, match=r"w\.safetensors: no tensor 'x'"):
        source.info("x")


# -- transformers-style folders ------------------------------------------------------------------


def _sharded_dir(folder: Path) -> dict[str, torch.Tensor]:
    folder.mkdir()
    first = {"embed.weight": torch.arange(6.0).view(3, 2), "layer.0.w": torch.ones(2, 2)}
    second = {"layer.1.w": torch.full((2, 2), 3.0), "head.bias": torch.tensor([1.0, 2.0])}
    save_file(first, str(folder / "model-00001-of-00002.safetensors"), metadata={"format": "pt"})
    save_file(second, str(folder / "model-00002-of-00002.safetensors"), metadata={"format": "pt"})
    weight_map = {k: "model-00001-of-00002.safetensors" for k in first}
    weight_map |= {k: "model-00002-of-00002.safetensors" for k in second}
    index = {"metadata": {"total_size": 64}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    (folder / "config.json").write_text("{}")
    return first | second


def test_sharded_transformers_folder_reads_across_shards(tmp_path: Path) -> None:
    expected = _sharded_dir(tmp_path / "hf")
    with load_source(tmp_path / "hf") as source:
        assert source.format == "safetensors-sharded"
        assert source.path == str(tmp_path / "hf")
        assert len(source.files) == 3
        _equal(source, expected)


def test_sharded_index_file_can_be_given_directly(tmp_path: Path) -> None:
    expected = _sharded_dir(tmp_path / "hf")
    with load_source(tmp_path / "hf" / "model.safetensors.index.json") as source:
        _equal(source, expected)


def test_missing_shard_is_named(tmp_path: Path) -> None:
    _sharded_dir(tmp_path / "hf")
    os.remove(tmp_path / "hf" / "model-00002-of-00002.safetensors")
    with pytest.raises(FormatError, match=r"shard model-00002-of-00002\.safetensors is missing"):
        load_source(tmp_path / "hf")


def test_index_that_disagrees_with_its_shards_is_named(tmp_path: Path) -> None:
    _sharded_dir(tmp_path / "hf")
    index_path = tmp_path / "hf" / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["ghost"] = "model-00001-of-00002.safetensors"
    index_path.write_text(json.dumps(index))
    with pytest.raises(FormatError, match=r"the index places 'ghost' here but the shard lacks it"):
        load_source(tmp_path / "hf")


def test_folder_with_single_model_safetensors_and_trainer_state(tmp_path: Path) -> None:
    folder = tmp_path / "checkpoint-500"
    folder.mkdir()
    save_file(SD, str(folder / "model.safetensors"))
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": 500, "epoch": 2.0}))
    with load_source(folder) as source:
        assert source.step == 500
        _equal(source, SD)


def test_folder_with_pytorch_model_bin(tmp_path: Path) -> None:
    folder = tmp_path / "hf"
    folder.mkdir()
    torch.save(SD, folder / "pytorch_model.bin")
    with load_source(folder) as source:
        assert source.format == "torch"
        _equal(source, SD)


def test_folder_with_sharded_pytorch_model_bin(tmp_path: Path) -> None:
    folder = tmp_path / "hf"
    folder.mkdir()
    torch.save({"a": torch.ones(2)}, folder / "pytorch_model-00001-of-00002.bin")
    torch.save({"b": torch.zeros(3)}, folder / "pytorch_model-00002-of-00002.bin")
    weight_map = {"a": "pytorch_model-00001-of-00002.bin", "b": "pytorch_model-00002-of-00002.bin"}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with load_source(folder) as source:
        assert source.format == "torch-sharded"
        _equal(source, {"a": torch.ones(2), "b": torch.zeros(3)})


def test_folder_without_weights_says_what_it_looked_for(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(FormatError, match=r"empty: a folder without model weights \(looked for meta\.json"):
        load_source(tmp_path / "empty")


# -- torch pickles ------------------------------------------------------------------------------


def test_top_level_state_dict_pickle(tmp_path: Path) -> None:
    torch.save(SD, tmp_path / "w.pt")
    with load_source(tmp_path / "w.pt") as source:
        assert source.format == "torch"
        _equal(source, SD)


@pytest.mark.parametrize("key", ["model", "state_dict", "model_state_dict", "module", "state_dict_ema"])
def test_state_dict_under_a_common_key_is_found(tmp_path: Path, key: str) -> None:
    torch.save({key: SD, "epoch": 4, "optimizer": {"state": {}, "param_groups": []}}, tmp_path / "w.pth")
    with load_source(tmp_path / "w.pth") as source:
        _equal(source, SD)
        assert source.metadata["epoch"] == 4


def test_key_selects_ema_weights_beside_the_model(tmp_path: Path) -> None:
    ema = {k: v + 1 if v.is_floating_point() else v for k, v in SD.items()}
    torch.save({"state_dict": SD, "state_dict_ema": ema}, tmp_path / "timm.pth.tar")
    with load_source(tmp_path / "timm.pth.tar") as plain:
        _equal(plain, SD)
    with load_source(tmp_path / "timm.pth.tar", key="state_dict_ema") as source:
        _equal(source, ema)


@pytest.mark.parametrize("key", ["ema.model", "ema/model"])
def test_nested_keys_with_dots_or_slashes(tmp_path: Path, key: str) -> None:
    torch.save({"ema": {"model": SD, "decay": 0.999}, "model": {"x": torch.ones(1)}}, tmp_path / "w.pt")
    with load_source(tmp_path / "w.pt", key=key) as source:
        _equal(source, SD)


def test_a_key_that_itself_contains_a_dot_wins_over_nesting(tmp_path: Path) -> None:
    torch.save({"model.ema": SD, "model": {"ema": {"x": torch.ones(1)}}}, tmp_path / "w.pt")
    with load_source(tmp_path / "w.pt", key="model.ema") as source:
        _equal(source, SD)


def test_nested_module_dicts_flatten_with_dots(tmp_path: Path) -> None:
    torch.save({"model": {"encoder": {"w": torch.ones(2)}, "head": torch.zeros(1)}}, tmp_path / "w.pt")
    with load_source(tmp_path / "w.pt") as source:
        assert source.keys() == ["encoder.w", "head"]


def test_missing_key_lists_the_keys_that_hold_tensors(tmp_path: Path) -> None:
    torch.save({"model": SD, "ema": {"weights": SD}}, tmp_path / "w.pt")
    with pytest.raises(
        FormatError, match=r"w\.pt: no key 'emma' holding tensors; keys with tensors: 'model'"
    ):
        load_source(tmp_path / "w.pt", key="emma")


def test_ambiguous_checkpoint_asks_for_a_key(tmp_path: Path) -> None:
    torch.save({"generator": SD, "discriminator": SD}, tmp_path / "gan.pt")
    with pytest.raises(FormatError, match=r"several dicts hold tensors \('generator', 'discriminator'\)"):
        load_source(tmp_path / "gan.pt")


def test_training_pickle_with_a_top_level_tensor_reads_only_the_model(tmp_path: Path) -> None:
    # A tensor beside the model (an RNG state) must not make the whole dict look like weights.
    optimizer = {"state": {0: {"exp_avg": torch.ones(2, 2), "step": torch.tensor(3.0)}}, "param_groups": []}
    checkpoint = {"model": SD, "optimizer": optimizer, "rng": torch.ByteTensor(8), "epoch": 3}
    torch.save(checkpoint, tmp_path / "train.pt")
    with load_source(tmp_path / "train.pt") as source:
        _equal(source, SD)
        assert source.metadata["epoch"] == 3


@pytest.mark.parametrize("key", ["state_dict", "model_state_dict", "module", "state_dict_ema"])
def test_known_keys_are_unwrapped_beside_top_level_tensors(tmp_path: Path, key: str) -> None:
    torch.save({key: SD, "step": torch.tensor(10), "scaler": {"scale": torch.tensor(2.0)}}, tmp_path / "w.pt")
    with load_source(tmp_path / "w.pt") as source:
        _equal(source, SD)


def test_mixed_tensors_and_dicts_of_tensors_ask_for_a_key(tmp_path: Path) -> None:
    optimizer = {"state": {0: {"exp_avg": torch.ones(2)}}, "param_groups": []}
    torch.save({"net_g": SD, "opt": optimizer, "rng": torch.ByteTensor(8)}, tmp_path / "gan.pt")
    with pytest.raises(FormatError) as caught:
        load_source(tmp_path / "gan.pt")
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"{tmp_path / 'gan.pt'}: mixes top-level tensors ('rng')")
    assert "'net_g'" in message and "'opt.state.0'" in message and "key= (--key)" in message
    with load_source(tmp_path / "gan.pt", key="net_g") as source:
        _equal(source, SD)
    with load_source(tmp_path / "gan.pt", key=".") as whole:
        assert "rng" in whole and "opt.state.0.exp_avg" in whole


def test_a_state_dict_with_extra_state_dicts_is_still_one_state_dict(tmp_path: Path) -> None:
    state = {**SD, "fp8._extra_state": {"scale": torch.ones(1)}}
    torch.save(state, tmp_path / "w.pt")
    with load_source(tmp_path / "w.pt") as source:
        assert sorted(source.keys()) == sorted([*SD, "fp8._extra_state.scale"])


def test_inspect_and_export_of_a_training_pickle_leave_the_optimizer_out(tmp_path: Path) -> None:
    from ladle.tools.export_weights import export_weights

    optimizer = {"state": {0: {"exp_avg": torch.ones(2, 2)}}, "param_groups": [{"lr": 0.1}]}
    torch.save({"model": SD, "optimizer": optimizer, "rng": torch.ByteTensor(8)}, tmp_path / "train.pt")
    export_weights(tmp_path / "train.pt", tmp_path / "weights.safetensors")
    assert sorted(load_file(str(tmp_path / "weights.safetensors"))) == sorted(SD)


def test_pickle_without_tensors_is_a_format_error(tmp_path: Path) -> None:
    torch.save({"epoch": 3}, tmp_path / "w.pt")
    with pytest.raises(FormatError, match=r"w\.pt: holds no state dict \(a dict\)"):
        load_source(tmp_path / "w.pt")


def test_lightning_checkpoint_with_prefix_strip_and_step(tmp_path: Path) -> None:
    ckpt = {
        "epoch": 2,
        "global_step": 300,
        "pytorch-lightning_version": "2.4.0",
        "state_dict": {f"model.{k}": v for k, v in SD.items()},
        "optimizer_states": [{"state": {}, "param_groups": []}],
        "lr_schedulers": [],
        "callbacks": {},
        "loops": {},
        "hyper_parameters": {"lr": 0.1},
    }
    torch.save(ckpt, tmp_path / "epoch=2-step=300.ckpt")
    with load_source(tmp_path / "epoch=2-step=300.ckpt", strip_prefix="model.") as source:
        assert source.step == 300
        assert source.metadata["pytorch-lightning_version"] == "2.4.0"
        _equal(source, SD)


def test_pickle_needing_full_unpickling_requires_trust(tmp_path: Path) -> None:
    # (argparse.Namespace, as timm and Lightning save it, is on ladle's reviewed allow-list.)
    ckpt = {"state_dict": SD, "hparams": fractions.Fraction(1, 10)}
    torch.save(ckpt, tmp_path / "lit.ckpt")
    with pytest.raises(
        UnsafeLoad, match=r"lit\.ckpt: holds objects other than tensors \(fractions\.Fraction\).*--trust"
    ):
        load_source(tmp_path / "lit.ckpt")
    with load_source(tmp_path / "lit.ckpt", trust=True) as source:
        _equal(source, SD)


def test_pickled_module_needs_trust_and_then_gives_its_state_dict(tmp_path: Path) -> None:
    module = torch.nn.Linear(2, 1)
    torch.save({"model": module}, tmp_path / "full.pt")
    with pytest.raises(UnsafeLoad):
        load_source(tmp_path / "full.pt")
    with load_source(tmp_path / "full.pt", trust=True) as source:
        _equal(source, {k: v.detach() for k, v in module.state_dict().items()})


def test_legacy_non_zip_pickle_still_loads(tmp_path: Path) -> None:
    torch.save(SD, tmp_path / "old.pt", _use_new_zipfile_serialization=False)
    with load_source(tmp_path / "old.pt") as source:
        _equal(source, SD)


def test_garbage_with_a_torch_name_is_a_format_error(tmp_path: Path) -> None:
    (tmp_path / "w.bin").write_bytes(b"not a checkpoint at all")
    with pytest.raises(FormatError, match=r"w\.bin: not a readable torch checkpoint"):
        load_source(tmp_path / "w.bin")


def test_tied_tensors_in_a_pickle_are_reported_as_ties(tmp_path: Path) -> None:
    emb = torch.arange(6.0).view(3, 2)
    torch.save({"embed.weight": emb, "head.weight": emb, "head.bias": torch.zeros(3)}, tmp_path / "w.pt")
    with load_source(tmp_path / "w.pt") as source:
        assert source.ties() == {"head.weight": "embed.weight"}
        state = source.state_dict()
        assert state["head.weight"].data_ptr() == state["embed.weight"].data_ptr()


def test_release_drops_mapped_pages_without_changing_values(tmp_path: Path) -> None:
    big = torch.arange(100_000, dtype=torch.float32)
    torch.save({"big": big, "small": torch.ones(3)}, tmp_path / "w.pt")
    with load_source(tmp_path / "w.pt") as source:
        assert float(source.tensor("big").sum()) == float(big.sum())
        source.release("big")
        assert torch.equal(source.tensor("big"), big)


# -- prefixes ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("keys", "strip", "expected"),
    [
        (["module.a", "module.b"], ["module."], ["a", "b"]),
        (["_orig_mod.a", "b"], ["_orig_mod."], ["a", "b"]),
        (["module._orig_mod.a"], ["module.", "_orig_mod."], ["a"]),
        (["model.a", "model.b"], "auto", ["a", "b"]),
        (["model.a", "loss.w"], "auto", ["model.a", "loss.w"]),
        (["module.model.a"], "module.,model.", ["a"]),
    ],
)
def test_prefix_stripping(tmp_path: Path, keys: list[str], strip: object, expected: list[str]) -> None:
    torch.save({k: torch.ones(1) for k in keys}, tmp_path / "w.pt")
    with load_source(tmp_path / "w.pt", strip_prefix=strip) as source:  # type: ignore[arg-type]
        assert source.keys() == expected
        assert torch.equal(source.tensor(expected[0]), torch.ones(1))


def test_prefix_strip_that_merges_two_keys_is_an_error(tmp_path: Path) -> None:
    torch.save({"module.a": torch.ones(1), "a": torch.zeros(1)}, tmp_path / "w.pt")
    with pytest.raises(FormatError, match=r"maps both 'module\.a' and 'a' to 'a'"):
        load_source(tmp_path / "w.pt", strip_prefix="module.")


# -- ladle checkpoints ---------------------------------------------------------------------------


def _ladle_checkpoint(run_dir: Path, *, ema: bool = True) -> Path:
    run = Run(run_dir, create=True).acquire()
    pending = run.begin("step-000000010")
    pending.write("model.safetensors", lambda p: save_file(SD, p))
    if ema:
        pending.write("ema.safetensors", lambda p: save_file({k: v * 2 for k, v in SD.items()}, p))
    info = pending.commit(step=10, epoch=1, metrics={"val_loss": 0.5})
    run.release()
    return Path(info.path)


def test_ladle_checkpoint_folder_reads_model_weights_and_meta(tmp_path: Path) -> None:
    folder = _ladle_checkpoint(tmp_path / "run")
    meta = json.loads((folder / "meta.json").read_text())
    with load_source(folder) as source:
        assert source.format == "ladle"
        assert source.step == 10
        assert source.metadata["metrics"] == {"val_loss": 0.5}
        (weights,) = source.files
        assert source.recorded[weights].sha256 == meta["files"]["model.safetensors"]["sha256"]
        assert source.recorded[weights].xxh3_128 == meta["files"]["model.safetensors"]["xxh3_128"]
        _equal(source, SD)


def test_ladle_checkpoint_key_ema_reads_ema_weights(tmp_path: Path) -> None:
    folder = _ladle_checkpoint(tmp_path / "run")
    with load_source(folder, key="ema") as source:
        _equal(source, {k: v * 2 for k, v in SD.items()})


def test_ladle_checkpoint_without_ema_says_what_it_has(tmp_path: Path) -> None:
    folder = _ladle_checkpoint(tmp_path / "run", ema=False)
    with pytest.raises(FormatError, match=r"no EMA weights \(ema\.safetensors\); this checkpoint has: model"):
        load_source(folder, key="ema")


def test_ladle_checkpoint_with_a_replaced_file_is_corrupt(tmp_path: Path) -> None:
    folder = _ladle_checkpoint(tmp_path / "run")
    save_file({"x": torch.ones(1)}, str(folder / "model.safetensors"))
    with pytest.raises(CorruptCheckpoint, match=r"model\.safetensors: \d+ bytes but meta\.json recorded"):
        load_source(folder)


def _sharded_ladle_checkpoint(run_dir: Path, state: dict[str, torch.Tensor]) -> Path:
    """A Trainer-style folder with sharded weights, recorded in place as a ladle checkpoint."""
    folder = run_dir / "checkpoint-2"
    folder.mkdir(parents=True)
    keys = sorted(state)
    shards = {"model-00001-of-00002.safetensors": keys[:1], "model-00002-of-00002.safetensors": keys[1:]}
    for shard, names in shards.items():
        save_file({k: state[k] for k in names}, str(folder / shard))
    index = {"metadata": {}, "weight_map": {k: shard for shard, names in shards.items() for k in names}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    run = Run(run_dir, create=True).acquire()
    run.adopt("checkpoint-2", step=2, epoch=0, metrics={"eval_loss": 1.0})
    run.release()
    return folder


def test_ladle_checkpoint_with_sharded_model_weights(tmp_path: Path) -> None:
    folder = _sharded_ladle_checkpoint(tmp_path / "run", SD)
    meta = json.loads((folder / "meta.json").read_text())
    with load_source(folder) as source, load_source(folder, key="model") as same:
        assert source.format == "ladle"
        assert source.step == 2 and source.metadata["name"] == "checkpoint-2"
        assert len(source.files) == 3
        assert {Path(f).name: (r.sha256, r.xxh3_128) for f, r in source.recorded.items()} == {
            name: (record["sha256"], record["xxh3_128"])
            for name, record in meta["files"].items()
            if name.startswith("model")
        }
        _equal(source, SD)
        _equal(same, SD)


def test_ladle_checkpoint_with_a_replaced_shard_is_corrupt(tmp_path: Path) -> None:
    folder = _sharded_ladle_checkpoint(tmp_path / "run", SD)
    shard = folder / "model-00002-of-00002.safetensors"
    save_file(
        {k: torch.cat([v.reshape(-1), v.reshape(-1)]) for k, v in load_file(str(shard)).items()}, str(shard)
    )
    with pytest.raises(
        CorruptCheckpoint, match=r"model-00002-of-00002\.safetensors: \d+ bytes but meta\.json"
    ):
        load_source(folder)


def test_aliases_recorded_by_the_run_store_are_restored(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    save_file(
        {"embed.weight": torch.ones(2, 2), "bias": torch.zeros(2)},
        str(path),
        metadata={"ladle.aliases": json.dumps({"head.weight": "embed.weight"})},
    )
    with load_source(path) as source:
        assert sorted(source.keys()) == ["bias", "embed.weight", "head.weight"]
        assert source.ties() == {"head.weight": "embed.weight"}
        assert torch.equal(source.tensor("head.weight"), torch.ones(2, 2))


# -- writing -----------------------------------------------------------------------------------


def test_save_tensors_writes_safetensors_that_safetensors_reads(tmp_path: Path) -> None:
    out = tmp_path / "out.safetensors"
    save_tensors(SD, out, metadata={"recipe": "last:3"})
    loaded = load_file(str(out))
    assert sorted(loaded) == sorted(SD)
    for key, value in SD.items():
        assert torch.equal(loaded[key], value)
    with safe_open(str(out), "pt") as handle:
        assert handle.metadata() == {"recipe": "last:3", "format": "pt"}


def test_safetensors_layout_is_aligned(tmp_path: Path) -> None:
    tensors = {
        "flag": torch.tensor([True, False, True]),
        "w": torch.ones(3),
        "d": torch.ones(1, dtype=torch.float64),
    }
    out = tmp_path / "out.safetensors"
    save_tensors(tensors, out)
    data = out.read_bytes()
    n = int.from_bytes(data[:8], "little")
    assert n % 8 == 0
    header = json.loads(data[8 : 8 + n])
    for key, value in tensors.items():
        assert header[key]["data_offsets"][0] % value.element_size() == 0


def test_tied_tensors_are_stored_under_every_name_and_restored_as_ties(tmp_path: Path) -> None:
    emb = torch.arange(4.0).view(2, 2)
    tensors = {"embed.weight": emb, "head.weight": emb}
    save_tensors(tensors, tmp_path / "out.safetensors")
    # every name is there for plain load_file; ladle's readers re-tie them (ladle.aliases)
    assert sorted(load_file(str(tmp_path / "out.safetensors"))) == ["embed.weight", "head.weight"]
    with load_source(tmp_path / "out.safetensors") as source:
        state = source.state_dict()
    assert state["head.weight"] is state["embed.weight"]
    save_tensors(tensors, tmp_path / "out.pt")
    loaded = torch.load(tmp_path / "out.pt", weights_only=True)
    assert loaded["head.weight"].data_ptr() == loaded["embed.weight"].data_ptr()


def test_torch_format_by_suffix_or_by_request(tmp_path: Path) -> None:
    save_tensors(SD, tmp_path / "a.pt")
    save_tensors(SD, tmp_path / "b.weights", format="torch")
    for name in ("a.pt", "b.weights"):
        loaded = torch.load(tmp_path / name, weights_only=True)
        assert all(torch.equal(loaded[k], v) for k, v in SD.items())


def test_format_that_contradicts_the_suffix_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"a \.safetensors name for torch format"):
        save_tensors(SD, tmp_path / "a.safetensors", format="torch")


def test_existing_output_is_refused_without_force(tmp_path: Path) -> None:
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"precious")
    with pytest.raises(OutputExists, match=r"out\.safetensors: already exists; pass force=True \(--force\)"):
        save_tensors(SD, out)
    assert out.read_bytes() == b"precious"
    save_tensors(SD, out, force=True)
    assert sorted(load_file(str(out))) == sorted(SD)


def test_directory_as_output_is_refused(tmp_path: Path) -> None:
    with pytest.raises(OutputExists, match="is a directory; give a file path"):
        save_tensors(SD, tmp_path)


def test_failed_write_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out.pt"
    out.write_bytes(b"old")

    def broken_save(obj: object, path: str) -> None:
        Path(path).write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_tensors(SD, out, force=True)
    assert sorted(os.listdir(tmp_path)) == ["out.pt"]
    assert out.read_bytes() == b"old"


def test_dict_source_wraps_an_in_memory_state_dict() -> None:
    emb = torch.ones(2)
    source = DictSource({"a": emb, "b": emb, "c": torch.zeros(1)})
    assert source.ties() == {"b": "a"}
    assert source.info("c") == (torch.Size([1]), torch.float32)
    with pytest.raises(FormatError, match="'x' is not a tensor"):
        DictSource({"x": 3})  # type: ignore[dict-item]
