"""How long a save blocks the training loop: asynchronous against synchronous, same state, one run.

    python bench/async_save.py [--params 25e6] [--saves 4] [--work 2.0] [--dir DIR]

A model of --params fp32 parameters (Linear 4096x4096 layers) plus AdamW state is
saved --saves times by a `CheckpointManager`, first synchronously, then with
`async_save=True`. Between saves the "training loop" mutates every parameter in
place and then waits --work seconds (standing in for accelerator compute, which
leaves the CPU free for the background writer). "blocked" is the time spent inside
`save()` calls, including any wait for the previous background commit; the target
is async blocked <= 10% of sync blocked. The last checkpoint of the async run is
checked against the parameters at its call.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

import ladle


def build(params: float) -> tuple[nn.Module, torch.optim.Optimizer]:
    width = 4096
    layers = max(1, round(params / (width * width + width)))
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for p in model.parameters():
        p.grad = torch.full_like(p, 1e-3)
    optimizer.step()
    for p in model.parameters():
        p.grad = None
    return model, optimizer


def loop(
    run: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    args: argparse.Namespace,
    asynchronous: bool,
):
    blocked, first_weight = [], None
    started = time.perf_counter()
    with ladle.CheckpointManager(
        run, model=model, optimizer=optimizer, keep=ladle.Keep(last=2), async_save=asynchronous
    ) as manager:
        for step in range(1, args.saves + 1):
            t0 = time.perf_counter()
            manager.save(step=step)
            blocked.append(time.perf_counter() - t0)
            first_weight = model[0].weight[0, :4].clone()
            with torch.no_grad():  # training changes the parameters right after the call
                for p in model.parameters():
                    p.add_(1.0)
            time.sleep(args.work)
        t0 = time.perf_counter()
    closing = time.perf_counter() - t0  # close() waits for the last commit
    total = time.perf_counter() - started
    latest = ladle.Run(run).latest()
    assert latest is not None and latest.step == args.saves
    with safe_open(latest.file("model.safetensors"), framework="pt") as handle:
        saved = handle.get_slice("0.weight")[0, :4]
    assert torch.equal(saved, first_weight), "the checkpoint does not hold the state at the call"
    return blocked, closing, total, latest.size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=float, default=25e6)
    parser.add_argument("--saves", type=int, default=4)
    parser.add_argument("--work", type=float, default=2.0, help="seconds of 'training' between saves")
    parser.add_argument("--dir", default=None)
    args = parser.parse_args()
    root = Path(args.dir or tempfile.mkdtemp(prefix="ladle-bench-async-"))
    model, optimizer = build(args.params)
    n = sum(p.numel() for p in model.parameters())
    print(
        f"model: {n / 1e6:.0f}M fp32 parameters + AdamW state; {args.saves} saves, {args.work}s of work between"
    )
    results = {}
    try:
        for name, asynchronous in (("sync", False), ("async", True)):
            blocked, closing, total, size = loop(root / name, model, optimizer, args, asynchronous)
            results[name] = statistics.median(blocked)
            print(
                f"{name:>5}: blocked per save median {statistics.median(blocked):.3f}s "
                f"(all: {', '.join(f'{b:.3f}' for b in blocked)}), close() {closing:.3f}s, "
                f"loop total {total:.1f}s, checkpoint {size / 1e9:.2f} GB"
            )
    finally:
        shutil.rmtree(root, ignore_errors=True)
    ratio = results["async"] / results["sync"]
    print(f"async blocked / sync blocked: {ratio:.1%} (target <= 10%)")


if __name__ == "__main__":
    main()
