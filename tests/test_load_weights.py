"""`ladle.load_weights(model, path)`: every ladle output and the files ladle reads, into a model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from ladle import CheckpointManager, StateMismatch, load_weights
from tests.foreign_checkpoints import timm_checkpoint, timm_model


class Tied(nn.Module):
    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(6, 3)
        self.head = nn.Linear(3, 6, bias=False)
        self.head.weight = self.embed.weight


def _same(a: nn.Module, b: nn.Module) -> bool:
    return all(
        torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )


def test_a_ladle_checkpoint_folder_and_run_reference(tmp_path: Path) -> None:
    source = Tied(0)
    with CheckpointManager(str(tmp_path / "run"), model=source) as manager:
        manager.save(step=1)
    assert _same(load_weights(Tied(1), tmp_path / "run" / "step-000000001"), source)
    assert _same(load_weights(Tied(2), f"{tmp_path / 'run'}/latest"), source)


def test_a_file_without_the_names_the_model_ties_itself(tmp_path: Path) -> None:
    # save_pretrained leaves out tied names (lm_head.weight); the model re-ties them.
    source = Tied(0)
    save_file({"embed.weight": source.embed.weight.detach()}, str(tmp_path / "model.safetensors"))
    loaded = load_weights(Tied(1), tmp_path / "model.safetensors")
    assert torch.equal(loaded.head.weight, source.embed.weight) and loaded.head.weight is loaded.embed.weight


def test_a_training_pickle_and_its_ema_weights(tmp_path: Path) -> None:
    saved = timm_checkpoint(tmp_path / "checkpoint-0.pth.tar", 0)
    raw = load_weights(timm_model(7), tmp_path / "checkpoint-0.pth.tar")
    assert torch.equal(raw.state_dict()["0.weight"], saved["state_dict"]["0.weight"])
    ema = load_weights(timm_model(7), tmp_path / "checkpoint-0.pth.tar", key="ema")
    assert torch.equal(ema.state_dict()["0.weight"], saved["state_dict_ema"]["0.weight"])


def test_wrapper_prefixes_are_matched_to_the_model(tmp_path: Path) -> None:
    source = timm_model(0)
    torch.save({f"module.{k}": v for k, v in source.state_dict().items()}, tmp_path / "ddp.pt")
    assert _same(load_weights(timm_model(1), tmp_path / "ddp.pt"), source)


def test_strict_loading_lists_every_mismatch_before_changing_the_model(tmp_path: Path) -> None:
    state = timm_model(0).state_dict()
    state.pop("3.bias")
    state["extra.weight"] = torch.ones(1)
    save_file(state, str(tmp_path / "bad.safetensors"))
    model = timm_model(1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(StateMismatch, match=r"3\.bias.*extra\.weight|extra\.weight.*3\.bias"):
        load_weights(model, tmp_path / "bad.safetensors")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    load_weights(model, tmp_path / "bad.safetensors", strict=False)  # what fits is loaded
    assert torch.equal(model.state_dict()["0.weight"], state["0.weight"])
