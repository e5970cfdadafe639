"""`ladle demo`: train on bundled data, then compare checkpoints, EMA, soups and an ensemble."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from ladle.cli.app import app, console, err_console, fail, print_json
from ladle.cli.display import examples
from ladle.demo.config import SCENARIOS, DemoConfig
from ladle.demo.runner import DemoResult
from ladle.demo.runner import Progress as DemoProgress

EXAMPLE = examples(
    "ladle demo",
    "ladle demo --seeds 5",
    "ladle demo --scenario small-val --seeds 10",
    "ladle demo --epochs 40 --label-noise 0.3 --out /tmp/demo --json",
)
_DEFAULTS = DemoConfig()
_DATA = {"digits": "digits", "small-val": "breast_cancer"}


class _Bar(DemoProgress):
    """The demo's progress on stderr: one bar per seed (epochs), then the contender being built."""

    def __init__(self, quiet: bool) -> None:
        self.bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[note]}"),
            TimeElapsedColumn(),
            console=err_console,
            transient=True,
            disable=quiet or not err_console.is_terminal,
        )
        self.task: int | None = None
        self.quiet = quiet

    def output_ready(self, out: str, removed: list[str]) -> None:
        if removed and not self.quiet:
            err_console.print(
                f"{_shown(out)}: replacing the previous demo's {', '.join(removed)}",
                highlight=False,
                markup=False,
            )

    def seed_started(self, seed: int, index: int, total: int, epochs: int) -> None:
        label = f"seed {seed}" + (f" ({index + 1}/{total})" if total > 1 else "")
        if self.task is not None:
            self.bar.remove_task(self.task)
        self.task = self.bar.add_task(f"{label}: training", total=epochs, note="")

    def epoch_done(self, seed: int, epoch: int, epochs: int, metrics: Mapping[str, float]) -> None:
        if self.task is not None:
            note = f"val_nll {metrics['val_nll']:.4f}  val_acc {metrics['val_acc']:.2%}"
            self.bar.update(self.task, completed=epoch, note=note)

    def building(self, seed: int, label: str) -> None:
        if self.task is not None:
            self.bar.update(self.task, description=f"seed {seed}: building", note=label)


def _shown(path: str) -> str:
    """A path as the user would type it: relative when it is under the working directory."""
    relative = os.path.relpath(path)
    return path if relative.startswith("..") else relative


@app.command("demo", epilog=EXAMPLE)
def demo_command(
    epochs: Annotated[
        int, typer.Option("--epochs", min=1, help="Training epochs (one checkpoint each).")
    ] = _DEFAULTS.epochs,
    seed: Annotated[
        int, typer.Option("--seed", min=0, help="Seed of the split, label noise, init and batches.")
    ] = _DEFAULTS.seed,
    label_noise: Annotated[
        float,
        typer.Option("--label-noise", help="Share of training labels flipped to a wrong class, 0 to <1."),
    ] = _DEFAULTS.label_noise,
    scenario: Annotated[
        str,
        typer.Option(
            "--scenario",
            help="digits (1797 rows, 360 to validate) or small-val (breast_cancer: 114 rows to validate, "
            "BatchNorm, soups recalibrated, greedy on NLL).",
        ),
    ] = _DEFAULTS.scenario,
    seeds: Annotated[
        int,
        typer.Option(
            "--seeds", min=1, help="Repeat over this many seeds (SEED, SEED+1, ...): mean ± std, W/T/L."
        ),
    ] = 1,
    out: Annotated[
        str, typer.Option("--out", help="Output folder; a previous demo's output there is replaced.")
    ] = "demo-out",
    no_report: Annotated[bool, typer.Option("--no-report", help="Do not draw report.png.")] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print results.json to stdout instead of tables.")
    ] = False,
) -> None:
    """Train a small network on bundled data and compare final models.

    The manager saves every epoch with EMA on (validation accuracy, macro-F1
    and NLL recorded). Then, on a held-out test split: the last checkpoint,
    the best one by validation NLL, the EMA weights at the end and at their
    best, the soups last-K, top-K, "improved on any validation metric" and
    greedy, and a prediction ensemble of the top K. --scenario small-val
    trains a BatchNorm network on breast_cancer (114 validation rows),
    recalibrates every soup, and adds greedy soups on validation NLL. Every
    number comes from the files the run wrote; a recipe that loses to the
    best single checkpoint says so. Writes results.json and report.png into --out.
    """
    from ladle.demo.runner import run_demo

    if scenario not in SCENARIOS:
        fail(f"--scenario {scenario!r} is not known; use {' or '.join(SCENARIOS)}")
    config = DemoConfig(
        **{
            **_DEFAULTS.to_dict(),
            "scenario": scenario,
            "epochs": epochs,
            "seed": seed,
            "label_noise": label_noise,
        }
    )
    progress = _Bar(quiet=as_json)
    with progress.bar:
        result = run_demo(config, out, seeds=seeds, progress=progress, report=not no_report)
    if as_json:
        print_json(result.to_dict())
        return
    _print(result)


def _print(result: DemoResult) -> None:
    from ladle.demo.table import run_table, summary_table

    config = result.config
    out = _shown(result.out)
    first = result.per_seed[0]
    data = first.data
    console.print(
        f"{_DATA[config.scenario]}: {data['train']} train "
        f"({data['flipped']} labels flipped, {config.label_noise:.0%}), "
        f"{data['val']} val, {data['test']} test",
        highlight=False,
    )
    for seed_result in result.per_seed:
        run = seed_result.run
        best = next(c for c in seed_result.contenders if c.key == "best")
        console.print(
            f"seed {seed_result.seed}: {config.epochs} epochs ({run.steps} steps) in {run.seconds:.1f} s, "
            f"{run.checkpoints} checkpoints in {_shown(run.path)}",
            highlight=False,
        )
        if result.summary is None:
            title = f"test split ({best.test.n} images); best checkpoint = {best.members[0]}"
            console.print(run_table(seed_result.contenders, title=title, ema_decay=config.ema_decay))
    if result.summary is not None:
        console.print(summary_table(result.summary, result.seeds, title="test split, over seeds"))
    soups = f"{out}/soups/" if result.summary is None else f"{out}/seed-*/soups/"
    written = [f"{out}/results.json", soups]
    if result.report:
        written.insert(0, _shown(result.report))
    console.print(f"wrote {', '.join(written)}", highlight=False)
    if result.report_skipped:
        console.print(f"report.png skipped: {result.report_skipped}", style="yellow", highlight=False)
    console.print(f"done in {result.seconds:.1f} s", highlight=False)
