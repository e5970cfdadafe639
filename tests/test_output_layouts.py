"""Outputs that load with the usual one-liners: tied weights in safetensors averages, soups and
exports load with plain `load_file` + `load_state_dict(strict=True)`, and ladle still re-ties them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from ladle import CheckpointManager, load_weights
from ladle.cli.main import main
from ladle.formats import load_source
from ladle.formats.write import write_safetensors


class Tied(nn.Module):
    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(10, 4)
        self.body = nn.Linear(4, 4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight


def _pt(path: Path, seed: int) -> Path:
    torch.save(Tied(seed).state_dict(), path)  # torch.save keeps the sharing
    return path


def test_an_average_of_tied_models_loads_with_plain_load_file(tmp_path: Path) -> None:
    a, b = _pt(tmp_path / "a.pt", 0), _pt(tmp_path / "b.pt", 1)
    out = tmp_path / "avg.safetensors"
    assert main(["avg", str(a), str(b), "-o", str(out)]) == 0
    model = Tied(2)
    model.load_state_dict(load_file(str(out)), strict=True)
    expected = (Tied(0).embed.weight + Tied(1).embed.weight) / 2
    assert torch.allclose(model.head.weight, expected) and model.head.weight is model.embed.weight


def test_ladle_reads_a_tied_copy_as_a_tie(tmp_path: Path) -> None:
    out = tmp_path / "avg.safetensors"
    assert main(["avg", str(_pt(tmp_path / "a.pt", 0)), str(_pt(tmp_path / "b.pt", 1)), "-o", str(out)]) == 0
    with safe_open(str(out), framework="pt") as handle:
        aliases = json.loads(handle.metadata()["ladle.aliases"])
        assert set(handle.keys()) >= {"embed.weight", "head.weight"}
    assert aliases == {"head.weight": "embed.weight"}
    with load_source(out) as source:
        assert source.ties() == {"head.weight": "embed.weight"}
        assert source.keys().count("head.weight") == 1


def test_tied_alias_mode_stores_the_tensor_once(tmp_path: Path) -> None:
    model = Tied(0)
    state = model.state_dict()
    write_safetensors(str(tmp_path / "copy.safetensors"), state)
    from ladle.formats.source import TensorInfo
    from ladle.formats.write import SafetensorsWriter

    layout = {k: TensorInfo(v.shape, v.dtype) for k, v in state.items()}
    writer = SafetensorsWriter(
        str(tmp_path / "alias.safetensors"), layout, ties={"head.weight": "embed.weight"}, tied="alias"
    )
    for key in writer.order:
        writer.write(key, state[key])
    writer.finish()
    with pytest.raises(RuntimeError, match="Missing key"):
        Tied(1).load_state_dict(load_file(str(tmp_path / "alias.safetensors")), strict=True)
    loaded = load_weights(Tied(1), tmp_path / "alias.safetensors")
    assert torch.equal(loaded.head.weight, model.embed.weight)
    copy_size = (tmp_path / "copy.safetensors").stat().st_size
    alias_size = (tmp_path / "alias.safetensors").stat().st_size
    assert copy_size - alias_size >= model.embed.weight.numel() * 4  # the copy's bytes (plus its header)


def test_a_soup_of_a_run_with_tied_weights_loads_with_plain_load_file(tmp_path: Path) -> None:
    model = Tied(0)
    with CheckpointManager(str(tmp_path / "run"), model=model) as manager:
        for step in (1, 2):
            with torch.no_grad():
                model.embed.weight.add_(1.0)
            manager.save(step=step)
    out = tmp_path / "soup.safetensors"
    assert main(["soup", str(tmp_path / "run"), "--recipe", "last:2", "-o", str(out)]) == 0
    fresh = Tied(5)
    fresh.load_state_dict(load_file(str(out)), strict=True)
    assert torch.allclose(fresh.head.weight, Tied(0).embed.weight + 1.5)


def test_an_export_of_a_tied_model_loads_with_plain_load_file(tmp_path: Path) -> None:
    out = tmp_path / "export.safetensors"
    assert main(["export", str(_pt(tmp_path / "a.pt", 0)), "-o", str(out)]) == 0
    Tied(3).load_state_dict(load_file(str(out)), strict=True)


# -- model folders: the average is a folder from_pretrained loads ---------------------


def _gpt2(folder: Path, seed: int) -> nn.Module:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    config = transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=16, n_positions=8)
    model = transformers.GPT2LMHeadModel(config)
    model.save_pretrained(folder)
    (folder / "tokenizer_config.json").write_text("{}")
    return model


def _mean_of(models: list[nn.Module], name: str) -> torch.Tensor:
    return sum(m.state_dict()[name] for m in models) / len(models)


@pytest.mark.parametrize("target", ["soup", "soup/model.safetensors"])
def test_avg_of_model_folders_writes_a_from_pretrained_folder(tmp_path: Path, target: str) -> None:
    transformers = pytest.importorskip("transformers")

    models = [_gpt2(tmp_path / f"m{seed}", seed) for seed in (0, 1)]
    code = main(["avg", str(tmp_path / "m0"), str(tmp_path / "m1"), "-o", str(tmp_path / target)])
    assert code == 0
    folder = tmp_path / "soup"
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "tokenizer_config.json", "model.safetensors", "model.safetensors.json"} <= names
    loaded = transformers.GPT2LMHeadModel.from_pretrained(folder)
    assert torch.allclose(loaded.transformer.wte.weight, _mean_of(models, "transformer.wte.weight"))
    assert loaded.lm_head.weight.data_ptr() == loaded.transformer.wte.weight.data_ptr()  # re-tied
    # the tied name stays out of the file, as save_pretrained leaves it out
    assert "lm_head.weight" not in load_file(str(folder / "model.safetensors"))


def test_an_existing_file_output_is_still_one_file(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    for seed in (0, 1):
        _gpt2(tmp_path / f"m{seed}", seed)
    out = tmp_path / "avg.safetensors"
    assert main(["avg", str(tmp_path / "m0"), str(tmp_path / "m1"), "-o", str(out)]) == 0
    assert out.is_file()


# -- training pickles: the average in the members' own structure ----------------------


def test_keep_structure_writes_the_newest_fairseq_checkpoint_with_averaged_weights(tmp_path: Path) -> None:
    from tests.foreign_checkpoints import fairseq_checkpoint

    old = fairseq_checkpoint(tmp_path / "checkpoint_1_100.pt", 100, seed=0)
    new = fairseq_checkpoint(tmp_path / "checkpoint_2_200.pt", 200, seed=1)
    out = tmp_path / "averaged.pt"
    args = ["avg", str(tmp_path / "checkpoint_2_200.pt"), str(tmp_path / "checkpoint_1_100.pt")]
    assert main([*args, "-o", str(out), "--keep-structure"]) == 0
    from ladle.formats.safe_globals import weights_only_load

    written = weights_only_load(str(out))
    assert set(written) == set(new)
    assert written["optimizer_history"][-1]["num_updates"] == 200
    assert written["extra_state"] == new["extra_state"] and written["args"] == new["args"]
    expected = (old["model"]["1.weight"] + new["model"]["1.weight"]) / 2
    assert torch.allclose(written["model"]["1.weight"], expected)
    assert (tmp_path / "averaged.pt.json").is_file()


def test_keep_structure_of_timm_checkpoints_keeps_the_newest_ema_and_optimizer(tmp_path: Path) -> None:
    from ladle.formats.safe_globals import weights_only_load
    from tests.foreign_checkpoints import timm_checkpoint

    a = timm_checkpoint(tmp_path / "checkpoint-1.pth.tar", 1)
    b = timm_checkpoint(tmp_path / "checkpoint-2.pth.tar", 2)
    out = tmp_path / "avg.pth.tar"
    paths = [
        str(tmp_path / "checkpoint-2.pth.tar"),
        str(tmp_path / "checkpoint-1.pth.tar"),
    ]  # newest by epoch
    assert main(["avg", *paths, "-o", str(out), "--keep-structure"]) == 0
    written = weights_only_load(str(out))
    assert written["epoch"] == 2 and written["args"] == b["args"]
    assert torch.equal(written["state_dict_ema"]["0.weight"], b["state_dict_ema"]["0.weight"])
    mean = (a["state_dict"]["0.weight"] + b["state_dict"]["0.weight"]) / 2
    assert torch.allclose(written["state_dict"]["0.weight"], mean)


def test_an_average_of_sharded_model_folders_is_sharded_like_the_newest(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")

    models = []
    for seed in (0, 1):
        model = _gpt2(tmp_path / f"m{seed}", seed)
        model.save_pretrained(tmp_path / f"m{seed}", max_shard_size="4KB")
        (tmp_path / f"m{seed}" / "model.safetensors").unlink(missing_ok=True)
        models.append(model)
    member_index = json.loads((tmp_path / "m1" / "model.safetensors.index.json").read_text())
    assert main(["avg", str(tmp_path / "m0"), str(tmp_path / "m1"), "-o", str(tmp_path / "soup")]) == 0
    index = json.loads((tmp_path / "soup" / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == member_index["weight_map"]
    assert not (tmp_path / "soup" / "model.safetensors").exists()
    loaded = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "soup")
    assert torch.allclose(
        loaded.transformer.h[0].mlp.c_fc.weight, _mean_of(models, "transformer.h.0.mlp.c_fc.weight")
    )


def test_avg_of_model_folders_to_a_url_uploads_a_from_pretrained_folder_weights_last(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    transformers = pytest.importorskip("transformers")
    import fsspec

    from ladle.store.fsspec_storage import FsspecStorage

    models = [_gpt2(tmp_path / f"m{seed}", seed) for seed in (0, 1)]
    uploaded: list[str] = []
    upload = FsspecStorage.upload

    def recording_upload(self: FsspecStorage, local: str, path: str, **options: bool) -> None:
        uploaded.append(path.rsplit("/", 1)[-1])
        upload(self, local, path, **options)

    monkeypatch.setattr(FsspecStorage, "upload", recording_upload)
    url = f"memory://ladle-{tmp_path.name}/soup"
    assert main(["avg", str(tmp_path / "m0"), str(tmp_path / "m1"), "-o", url]) == 0
    # the folder is complete only once the weights arrive: they (after their provenance) go last
    assert uploaded[-2:] == ["model.safetensors.json", "model.safetensors"]
    fs = fsspec.filesystem("memory")
    local = tmp_path / "downloaded"
    local.mkdir()
    for remote in fs.ls(url, detail=False):
        fs.get(remote, str(local / remote.rsplit("/", 1)[-1]))
    loaded = transformers.GPT2LMHeadModel.from_pretrained(local)
    assert torch.allclose(loaded.transformer.wte.weight, _mean_of(models, "transformer.wte.weight"))
    assert main(["avg", str(tmp_path / "m0"), str(tmp_path / "m1"), "-o", url]) == 2  # exists: --force
