"""Benchmark: one EMA update of a ~100M-parameter transformer on CPU.

Compares, in the same process and interleaved round by round (so a noisy
neighbour hurts every contender alike):
  loop        the per-parameter Python loop of common tutorials,
              `e.copy_(decay * e + (1 - decay) * p)` for each parameter
  loop-inplace the best-case loop, `e.mul_(decay).add_(p, alpha=1 - decay)`
  averaged    torch.optim.swa_utils.AveragedModel with get_ema_multi_avg_fn
  ladle       ladle.EMA (one torch._foreach_lerp_ per device/dtype group)

Run: .venv/bin/python bench/ema.py [--layers 14] [--updates 5] [--rounds 8]
Prints the median and minimum milliseconds per update of each contender (the
minimum is the figure least disturbed by other processes) and ladle's ratios.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings
from collections.abc import Callable

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from ladle import EMA

DECAY = 0.999


def build_model(layers: int) -> nn.Module:
    """A GPT-2-small-like encoder stack: 768 wide, 12 heads, ~7.1M parameters per layer."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nested-tensor advice about batch_first
        return nn.TransformerEncoder(
            nn.TransformerEncoderLayer(768, 12, dim_feedforward=3072, batch_first=True),
            num_layers=layers,
        )


def tutorial_loop(model: nn.Module) -> Callable[[], None]:
    shadow = copy.deepcopy(model).requires_grad_(False)
    pairs = list(zip(shadow.parameters(), model.parameters(), strict=True))

    @torch.no_grad()
    def update() -> None:
        for e, p in pairs:
            e.copy_(DECAY * e + (1 - DECAY) * p)

    return update


def inplace_loop(model: nn.Module) -> Callable[[], None]:
    shadow = copy.deepcopy(model).requires_grad_(False)
    pairs = list(zip(shadow.parameters(), model.parameters(), strict=True))

    @torch.no_grad()
    def update() -> None:
        for e, p in pairs:
            e.mul_(DECAY).add_(p, alpha=1 - DECAY)

    return update


def averaged_model(model: nn.Module) -> Callable[[], None]:
    averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(DECAY), use_buffers=False)
    averaged.update_parameters(model)  # the first call only copies; time the averaging ones

    def update() -> None:
        averaged.update_parameters(model)

    return update


def ladle_ema(model: nn.Module) -> Callable[[], None]:
    ema = EMA(model, decay=DECAY)
    return ema.update


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=14, help="encoder layers (14 = ~99M params)")
    parser.add_argument("--updates", type=int, default=5, help="timed updates per round")
    parser.add_argument("--rounds", type=int, default=8, help="interleaved rounds")
    args = parser.parse_args()

    model = build_model(args.layers)
    params = sum(p.numel() for p in model.parameters())
    tensors = sum(1 for _ in model.parameters())
    contenders = {
        "loop": tutorial_loop(model),
        "loop-inplace": inplace_loop(model),
        "averaged": averaged_model(model),
        "ladle": ladle_ema(model),
    }
    for update in contenders.values():  # warm up allocator and thread pool
        update()
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(args.rounds):
        for name, update in contenders.items():
            for _ in range(args.updates):
                start = time.perf_counter()
                update()
                times[name].append((time.perf_counter() - start) * 1e3)

    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{params / 1e6:.1f}M parameters in {tensors} tensors, float32, CPU"
    )
    print(f"ms per update, {args.rounds} interleaved rounds x {args.updates} updates each:")
    median = {name: statistics.median(t) for name, t in times.items()}
    best = {name: min(t) for name, t in times.items()}
    print(f"  {'':<13} {'median':>9} {'min':>9} {'max':>9}")
    for name in contenders:
        print(f"  {name:<13} {median[name]:9.1f} {best[name]:9.1f} {max(times[name]):9.1f}")
    for label, stat in (("median", median), ("min", best)):
        print(
            f"by {label}: ladle is {stat['loop'] / stat['ladle']:.2f}x faster than loop, "
            f"{stat['loop-inplace'] / stat['ladle']:.2f}x faster than loop-inplace, "
            f"{stat['ladle'] / stat['averaged']:.2f}x the AveragedModel time"
        )


if __name__ == "__main__":
    main()
