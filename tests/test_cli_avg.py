"""`ladle avg` and `ladle soup` on the command line: results, output and exit codes."""

from __future__ import annotations

import fractions
import json
import logging
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ladle.cli.main import main
from ladle.store.run import Run


def _st(path: Path, **tensors: torch.Tensor) -> str:
    save_file(tensors, str(path))
    return str(path)


def _run(path: Path) -> str:
    run = Run(path, create=True).acquire()
    for i, (value, loss) in enumerate([(1.0, 0.5), (2.0, 0.3), (6.0, 0.4)], start=1):
        pending = run.begin(f"step-{i:09d}")
        pending.write("model.safetensors", lambda p, v=value: save_file({"w": torch.tensor([v])}, p))
        pending.commit(
            step=i, epoch=i, metrics={"val_loss": loss}, monitor={"metric": "val_loss", "mode": "min"}
        )
    run.release()
    return str(path)


def _error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    return err


def test_avg_writes_the_average(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = _st(tmp_path / "a.safetensors", w=torch.tensor([1.0, 2.0]))
    b = _st(tmp_path / "b.safetensors", w=torch.tensor([3.0, 6.0]))
    out = tmp_path / "avg.safetensors"
    assert main(["avg", a, b, "-o", str(out)]) == 0
    assert load_file(str(out))["w"].tolist() == [2.0, 4.0]
    assert f"averaged 2 checkpoints into {out}" in capsys.readouterr().out


def test_avg_options_reach_the_engine(tmp_path: Path) -> None:
    torch.save({"model": {"module.w": torch.tensor([1.0]), "module.n": torch.tensor(7)}}, tmp_path / "a.pt")
    torch.save({"model": {"module.w": torch.tensor([3.0]), "module.n": torch.tensor(2)}}, tmp_path / "b.pt")
    out = tmp_path / "avg.pt"
    argv = ["avg", str(tmp_path / "a.pt"), str(tmp_path / "b.pt"), "-o", str(out), "--key", "model"]
    argv += ["--strip-prefix", "module.", "--weights", "1,3", "--int-policy", "first", "--dtype", "bf16"]
    assert main(argv) == 0
    loaded = torch.load(out, weights_only=True)
    assert loaded["w"].dtype == torch.bfloat16
    assert loaded["w"].tolist() == [2.5]
    assert loaded["n"].item() == 7


def test_avg_json_prints_the_provenance(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = _st(tmp_path / "a.safetensors", w=torch.tensor([1.0]))
    b = _st(tmp_path / "b.safetensors", w=torch.tensor([3.0]))
    assert main(["avg", a, b, "-o", str(tmp_path / "o.safetensors"), "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["output"] == str(tmp_path / "o.safetensors")
    assert [m["path"] for m in record["members"]] == [a, b]
    assert [m["weight"] for m in record["members"]] == [0.5, 0.5]


def test_avg_expands_a_run(tmp_path: Path) -> None:
    run = _run(tmp_path / "run")
    assert main(["avg", run, "-o", str(tmp_path / "o.safetensors")]) == 0
    assert load_file(str(tmp_path / "o.safetensors"))["w"].tolist() == [3.0]


def test_avg_refuses_to_overwrite_without_force(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = _st(tmp_path / "a.safetensors", w=torch.tensor([1.0]))
    out = tmp_path / "o.safetensors"
    out.write_bytes(b"old")
    assert main(["avg", a, "-o", str(out)]) == 2
    assert "already exists; pass force=True (--force) to replace it" in _error_line(capsys)
    assert main(["avg", a, "-o", str(out), "--force"]) == 0


def _lightning_ckpt(path: Path, value: float, step: int, last_model_path: str) -> Path:
    """A .ckpt as Lightning writes it; its callback state differs between two saves of one step."""
    checkpoint = {
        "epoch": step // 8 - 1,
        "global_step": step,
        "state_dict": {"net.weight": torch.tensor([[value, 2 * value]]), "net.bias": torch.tensor([value])},
        "callbacks": {"ModelCheckpoint": {"last_model_path": last_model_path}},
        "optimizer_states": [{"state": {}, "param_groups": []}],
    }
    torch.save(checkpoint, path)
    return path


def _lightning_folder(folder: Path) -> Path:
    folder.mkdir()
    for epoch, value in enumerate([1.0, 2.0, 6.0]):
        _lightning_ckpt(folder / f"epoch={epoch}-step={8 * (epoch + 1)}.ckpt", value, 8 * (epoch + 1), "")
    # save_last=True: the newest checkpoint saved again (same weights, different bytes).
    _lightning_ckpt(folder / "last.ckpt", 6.0, 24, str(folder / "last.ckpt"))
    return folder


def test_avg_of_a_folder_counts_lightnings_last_ckpt_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = _lightning_folder(tmp_path / "checkpoints")
    out = tmp_path / "avg.safetensors"
    with caplog.at_level(logging.INFO, logger="ladle"):
        assert main(["avg", str(folder), "-o", str(out), "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert [Path(m["path"]).name for m in record["members"]] == [
        "epoch=0-step=8.ckpt",
        "epoch=1-step=16.ckpt",
        "epoch=2-step=24.ckpt",
    ]
    assert load_file(str(out))["net.bias"].tolist() == [3.0]
    assert "last.ckpt holds the same weights as" in caplog.text and "counting it once" in caplog.text


def test_keep_duplicates_counts_lightnings_last_ckpt_too(tmp_path: Path) -> None:
    folder = _lightning_folder(tmp_path / "checkpoints")
    out = tmp_path / "avg.safetensors"
    assert main(["avg", str(folder), "-o", str(out), "--keep-duplicates"]) == 0
    assert load_file(str(out))["net.bias"].tolist() == [15.0 / 4]


def test_same_weights_named_one_by_one_are_both_counted(tmp_path: Path) -> None:
    folder = _lightning_folder(tmp_path / "checkpoints")
    out = tmp_path / "avg.safetensors"
    named = [str(folder / "epoch=2-step=24.ckpt"), str(folder / "last.ckpt")]
    assert main(["avg", *named, "-o", str(out)]) == 0
    assert len(json.loads((tmp_path / "avg.safetensors.json").read_text())["members"]) == 2


def test_same_weights_at_different_steps_are_both_counted(tmp_path: Path) -> None:
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    _lightning_ckpt(folder / "a.ckpt", 1.0, 8, "")
    _lightning_ckpt(folder / "b.ckpt", 1.0, 16, "")  # e.g. a frozen model: two points of training
    out = tmp_path / "avg.safetensors"
    assert main(["avg", str(folder), "-o", str(out)]) == 0
    assert len(json.loads((tmp_path / "avg.safetensors.json").read_text())["members"]) == 2


def test_one_differing_value_is_not_a_duplicate(tmp_path: Path) -> None:
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    big = torch.zeros(600_000)  # more than one comparison block
    changed = big.clone()
    changed[-1] = 1.0
    torch.save(
        {"global_step": 8, "state_dict": {"a": big, "b": torch.ones(3), "z": torch.ones(2)}},
        folder / "x.ckpt",
    )
    torch.save(
        {"global_step": 8, "state_dict": {"a": changed, "b": torch.ones(3), "z": torch.ones(2)}},
        folder / "y.ckpt",
    )
    out = tmp_path / "avg.safetensors"
    assert main(["avg", str(folder), "-o", str(out)]) == 0
    assert load_file(str(out))["a"][-1].item() == 0.5


@pytest.mark.parametrize(
    ("make", "extra", "message"),
    [
        (lambda d: [str(d / "missing.pt")], [], "missing.pt: no such file, folder or run checkpoint"),
        (
            lambda d: [_st(d / "a.safetensors", x=torch.ones(1)), _st(d / "b.safetensors", y=torch.ones(1))],
            [],
            "members disagree on keys",
        ),
        (
            lambda d: [_st(d / "a.safetensors", x=torch.ones(1)), _st(d / "b.safetensors", x=torch.ones(1))],
            ["--weights", "1,-2"],
            "weights must not be negative",
        ),
        (
            lambda d: [
                _st(d / "a.safetensors", x=torch.ones(1)),
                _st(d / "b.safetensors", x=torch.tensor([float("nan")])),
            ],
            [],
            "b.safetensors: 'x' holds 1 non-finite value(s) (NaN)",
        ),
        (
            lambda d: [_st(d / "a.safetensors", x=torch.ones(1))],
            ["--dtype", "int4"],
            "dtype='int4' is not a floating dtype",
        ),
        (
            lambda d: [_st(d / "a.safetensors", x=torch.ones(1))],
            ["--format", "torch"],
            "a torch file name for safetensors format",
        ),
    ],
)
def test_avg_bad_input_exits_2_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], make, extra: list[str], message: str
) -> None:  # type: ignore[no-untyped-def]
    out = "o.pt" if "--format" in extra else "o.safetensors"
    if "--format" in extra:
        extra = ["--format", "safetensors"]
    code = main(["avg", *make(tmp_path), "-o", str(tmp_path / out), *extra])
    assert code == 2
    line = _error_line(capsys)
    assert line.startswith("ladle: error: ")
    assert message in line
    assert not (tmp_path / out).exists() or out == "o.pt"


def test_unsafe_pickle_needs_trust(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Fraction is on no allow-list: loading it means running the pickle's code.
    torch.save({"state_dict": {"w": torch.ones(1)}, "hparams": fractions.Fraction(1, 3)}, tmp_path / "a.ckpt")
    out = str(tmp_path / "o.safetensors")
    assert main(["avg", str(tmp_path / "a.ckpt"), "-o", out]) == 2
    assert "pass trust=True (--trust)" in _error_line(capsys)
    assert main(["avg", str(tmp_path / "a.ckpt"), "-o", out, "--trust"]) == 0


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    a = _st(tmp_path / "a.safetensors", w=torch.ones(1))
    assert main(["avg", a, "-o", str(tmp_path / "o.safetensors"), "--int-policy", "mean"]) == 2
    assert main(["avg", a]) == 2


@pytest.mark.parametrize("command", ["avg", "soup"])
def test_help_has_an_example(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert "Examples:" in out
    assert f"ladle {command}" in out


# -- soup ----------------------------------------------------------------------------------------------


def test_soup_writes_the_recipes_average(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = _run(tmp_path / "run")
    out = tmp_path / "soup.safetensors"
    assert main(["soup", run, "-o", str(out), "--recipe", "top:2"]) == 0
    assert load_file(str(out))["w"].tolist() == [4.0]
    printed = capsys.readouterr().out
    assert "top:2:val_loss:min" in printed
    assert "step-000000002" in printed and "step-000000003" in printed


def test_soup_window_and_weights(tmp_path: Path) -> None:
    run = _run(tmp_path / "run")
    out = tmp_path / "soup.safetensors"
    assert (
        main(
            ["soup", run, "-o", str(out), "--recipe", "uniform", "--window", "epoch:2-3", "--weights", "3,1"]
        )
        == 0
    )
    assert load_file(str(out))["w"].tolist() == [3.0]


def test_soup_dry_run_json_lists_members_and_weights(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = _run(tmp_path / "run")
    assert main(["soup", run, "--recipe", "last:2", "--dry-run", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["recipe"] == "last:2"
    assert [(m["name"], m["weight"]) for m in data["members"]] == [
        ("step-000000002", 0.5),
        ("step-000000003", 0.5),
    ]


def test_soup_into_run(tmp_path: Path) -> None:
    run = _run(tmp_path / "run")
    assert main(["soup", run, "--recipe", "last:2", "--into-run", "--name", "final"]) == 0
    info = Run(run).get("final")
    assert info.kind == "soup"
    assert load_file(info.file("model.safetensors"))["w"].tolist() == [4.0]


def test_soup_without_a_destination_is_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = _run(tmp_path / "run")
    assert main(["soup", run, "--recipe", "last:2"]) == 2
    assert "give -o OUT, --into-run, or --dry-run" in _error_line(capsys)


def test_soup_bad_recipe_is_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = _run(tmp_path / "run")
    assert main(["soup", run, "--recipe", "best:2", "--dry-run"]) == 2
    assert "recipe 'best:2' not understood" in _error_line(capsys)


def test_soup_greedy_with_eval_and_model_from_a_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = _run(tmp_path / "run")
    user = tmp_path / "user_eval.py"
    user.write_text(
        textwrap.dedent(
            """
            import torch
            from torch import nn

            class Flat(nn.Module):
                def __init__(self):
                    super().__init__()
                    self.w = nn.Parameter(torch.zeros(1))

            def build():
                return Flat()

            def evaluate(model):
                return {"score": -abs(float(model.w.detach()) - 2.4)}
            """
        )
    )
    out = tmp_path / "g.safetensors"
    argv = ["soup", run, "-o", str(out), "--recipe", "greedy:score:max"]
    argv += ["--eval", f"{user}:evaluate", "--model", f"{user}:build"]
    assert main(argv) == 0
    # own scores: 2 -> -0.4, 1 -> -1.4, 6 -> -3.6; {2, 1} gives 1.5 (-0.9): rejected
    assert load_file(str(out))["w"].tolist() == [2.0]
    printed = capsys.readouterr().out
    assert "greedy search" in printed


def test_soup_eval_spec_errors_are_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = _run(tmp_path / "run")
    argv = [
        "soup",
        run,
        "-o",
        str(tmp_path / "g.safetensors"),
        "--recipe",
        "greedy:acc:max",
        "--eval",
        "nomodule",
    ]
    assert main(argv) == 2
    assert "--eval 'nomodule': expected MODULE:FUNCTION" in _error_line(capsys)


def test_avg_warns_about_batchnorm_statistics(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    bn = torch.nn.BatchNorm1d(2)
    a = _st(tmp_path / "a.safetensors", **{f"bn.{k}": v for k, v in bn.state_dict().items()})
    b = _st(tmp_path / "b.safetensors", **{f"bn.{k}": v + 1 for k, v in bn.state_dict().items()})
    with caplog.at_level(logging.WARNING, logger="ladle"):
        assert main(["avg", a, b, "-o", str(tmp_path / "o.safetensors")]) == 0
    assert "BatchNorm running statistics (1 layers)" in caplog.text


def test_soup_model_without_eval_is_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = _run(tmp_path / "run")
    assert main(["soup", run, "-o", str(tmp_path / "s.safetensors"), "--model", "x:y"]) == 2
    assert "--model is only used with --eval" in _error_line(capsys)
