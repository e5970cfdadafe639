"""Running the whole demo: train per seed, build and score every contender, write the results.

Layout of the output folder (one seed):

    demo-out/
      .ladle-demo        marks the folder as the demo's, so a rerun may replace it
      run/               the training run: one checkpoint per epoch (EMA inside)
      soups/             every soup, with its provenance (`<soup>.safetensors.json`)
      results.json       config, per-contender members, files and scores, timings
      report.png         learning curves with the checkpoints and soup members marked

With several seeds, each seed gets `seed-<n>/run` and `seed-<n>/soups`, and
`report.png` shows the first seed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ladle._version import __version__
from ladle.demo.config import DemoConfig
from ladle.demo.contenders import Contender, build_contenders
from ladle.demo.data import load_splits
from ladle.demo.table import Summary, summarize
from ladle.demo.training import MONITOR, TrainedRun, train
from ladle.errors import ConfigError, MissingDependency, OutputExists

log = logging.getLogger("ladle")

MARKER = ".ladle-demo"
RESULTS = "results.json"
REPORT = "report.png"
_OURS = ("run", "soups", RESULTS, REPORT)


class Progress:
    """What the demo reports while it works; the CLI draws it, the default ignores it."""

    def output_ready(self, out: str, removed: list[str]) -> None:
        """`out` is ready; `removed` lists what an earlier demo left there and was deleted."""

    def seed_started(self, seed: int, index: int, total: int, epochs: int) -> None:
        """Training of seed `index + 1` of `total` begins."""

    def epoch_done(self, seed: int, epoch: int, epochs: int, metrics: Mapping[str, float]) -> None:
        """`epoch` of `epochs` finished and was checkpointed."""

    def building(self, seed: int, label: str) -> None:
        """A contender is being built and scored."""


@dataclass(kw_only=True)
class SeedResult:
    """One seed's run and its contenders."""

    seed: int
    folder: str
    """Relative to the output folder: "." for a single seed, "seed-<n>" otherwise."""
    run: TrainedRun
    contenders: list[Contender]
    data: dict[str, int]
    seconds: float

    def to_dict(self, base: str) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "folder": self.folder,
            "run": os.path.relpath(self.run.path, base),
            "data": self.data,
            "train": {
                "steps": self.run.steps,
                "checkpoints": self.run.checkpoints,
                "seconds": round(self.run.seconds, 3),
            },
            "seconds": round(self.seconds, 3),
            "contenders": [c.to_dict() for c in self.contenders],
        }


@dataclass(kw_only=True)
class DemoResult:
    """Everything the demo produced."""

    config: DemoConfig
    out: str
    seeds: list[int]
    per_seed: list[SeedResult]
    summary: list[Summary] | None
    """Mean ± std and W/T/L per contender, when more than one seed ran."""
    report: str | None
    """The report's path, or None when matplotlib is missing."""
    report_skipped: str | None = None
    """Why no report was drawn."""
    replaced: list[str] = field(default_factory=list)
    """What a previous demo left in the folder and was removed first."""
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": "ladle-demo/1",
            "ladle_version": __version__,
            "config": self.config.to_dict(),
            "monitor": {"metric": MONITOR, "mode": "min"},
            "seeds": self.seeds,
            "per_seed": [s.to_dict(self.out) for s in self.per_seed],
            "summary": [s.to_dict() for s in self.summary] if self.summary is not None else None,
            "report": os.path.relpath(self.report, self.out) if self.report else None,
            "seconds": round(self.seconds, 3),
        }


def prepare_output(out: str) -> list[str]:
    """Make `out` ready for a fresh demo; returns what a previous demo left there and was removed.

    A folder that holds anything without the demo's marker is refused, so that
    the demo never deletes files it did not write.
    """
    out = os.path.abspath(out)
    if os.path.exists(out) and not os.path.isdir(out):
        raise OutputExists(f"{out}: is a file; pass --out with a folder for the demo's output")
    os.makedirs(out, exist_ok=True)
    entries = sorted(os.listdir(out))
    if entries and MARKER not in entries:
        raise OutputExists(
            f"{out}: holds files `ladle demo` did not write ({', '.join(entries[:3])}"
            f"{', ...' if len(entries) > 3 else ''}); pass --out with a new or empty folder"
        )
    removed = []
    for name in entries:
        if name in _OURS or (name.startswith("seed-") and os.path.isdir(os.path.join(out, name))):
            path = os.path.join(out, name)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.remove(path)
            removed.append(name)
    with open(os.path.join(out, MARKER), "w", encoding="utf-8") as handle:
        handle.write("This folder is written by `ladle demo`; a new demo run replaces its contents.\n")
    return removed


@contextlib.contextmanager
def deterministic() -> Iterator[None]:
    """Deterministic kernels, one CPU thread and a private RNG state; the caller's come back after.

    The network is tiny: one thread is as fast as several, the numbers do not
    depend on the machine's core count, and other busy processes cannot stall
    the threads of a parallel kernel (which slows small kernels down tenfold).
    """
    previous = torch.are_deterministic_algorithms_enabled()
    threads = torch.get_num_threads()
    with torch.random.fork_rng(devices=[]):
        torch.use_deterministic_algorithms(True)
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(threads)
            torch.use_deterministic_algorithms(previous)


def run_seed(config: DemoConfig, out: str, folder: str, progress: Progress) -> SeedResult:
    """Train one seed into `out/folder/run` and build its contenders into `out/folder/soups`."""
    started = time.perf_counter()
    base = os.path.join(out, folder)
    splits = load_splits(
        seed=config.seed,
        label_noise=config.label_noise,
        val_fraction=config.val_fraction,
        test_fraction=config.test_fraction,
        scenario=config.scenario,
    )
    with deterministic():
        trained = train(
            config,
            splits,
            os.path.join(base, "run"),
            on_epoch=lambda epoch, metrics: progress.epoch_done(config.seed, epoch, config.epochs, metrics),
        )
        contenders = build_contenders(
            config,
            splits,
            trained.path,
            os.path.join(base, "soups"),
            out,
            on_build=lambda label: progress.building(config.seed, label),
        )
    return SeedResult(
        seed=config.seed,
        folder=folder,
        run=trained,
        contenders=contenders,
        data={
            "train": len(splits.train),
            "val": len(splits.val),
            "test": len(splits.test),
            "flipped": splits.flipped,
        },
        seconds=time.perf_counter() - started,
    )


def report_recipes(result: SeedResult, out: str) -> list[str]:
    """What report.png marks: the members of each soup, read from the soup files' provenance."""
    return [os.path.join(out, c.files[0]) for c in result.contenders if c.kind == "soup"]


def run_demo(
    config: DemoConfig | None = None,
    out: str = "demo-out",
    *,
    seeds: int = 1,
    progress: Progress | None = None,
    report: bool = True,
) -> DemoResult:
    """Run the demo: `seeds` runs (seeds `config.seed`, `config.seed + 1`, ...) into `out`.

    Replaces what an earlier demo wrote in `out` (see `prepare_output`), then
    writes `results.json` and, with matplotlib installed, `report.png`.
    """
    config = config or DemoConfig()
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ConfigError(f"seeds={seeds!r} must be a whole number >= 1")
    progress = progress or Progress()
    started = time.perf_counter()
    out = os.path.abspath(out)
    replaced = prepare_output(out)
    progress.output_ready(out, replaced)
    seed_list = [config.seed + i for i in range(seeds)]
    per_seed = []
    for index, seed in enumerate(seed_list):
        progress.seed_started(seed, index, seeds, config.epochs)
        folder = "." if seeds == 1 else f"seed-{seed}"
        per_seed.append(run_seed(config.with_seed(seed), out, folder, progress))
    summary = summarize([s.contenders for s in per_seed]) if seeds > 1 else None
    report_path: str | None = None
    skipped: str | None = None
    if report:
        from ladle.tools.report import plot_run

        first = per_seed[0]
        try:
            drawn = plot_run(
                first.run.path,
                os.path.join(out, REPORT),
                recipes=report_recipes(first, out),
                title=f"ladle demo ({config.scenario}), seed {first.seed}: "
                f"{config.label_noise:.0%} of training labels flipped",
            )
            report_path = drawn.path
        except MissingDependency as exc:
            skipped = str(exc)
            log.warning("report.png skipped: %s", exc)
    result = DemoResult(
        config=config,
        out=out,
        seeds=seed_list,
        per_seed=per_seed,
        summary=summary,
        report=report_path,
        report_skipped=skipped,
        replaced=replaced,
    )
    result.seconds = time.perf_counter() - started
    with open(os.path.join(out, RESULTS), "w", encoding="utf-8") as handle:
        json.dump(result.to_dict(), handle, indent=1)
        handle.write("\n")
    return result


def load_results(out: str) -> dict[str, Any]:
    """The `results.json` a demo wrote into `out`."""
    with open(os.path.join(out, RESULTS), encoding="utf-8") as handle:
        return dict(json.load(handle))
