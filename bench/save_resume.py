"""Save and resume of a large model with AdamW state: ladle against plain torch, same run.

    python bench/save_resume.py [--params 250e6] [--repeat 3] [--dir DIR]

Save: `CheckpointManager.save()` (safetensors weights + weights-only state file,
fsync of every file, sha256 and xxh3-128 of every file in one read, meta.json, rename, index) against
`torch.save` of the same state dict followed by fsync. Resume:
`CheckpointManager.resume()` (with checksum verification, and without) against
a raw read of the same bytes into memory. Peak memory is the highest resident
set size sampled every 2 ms during the operation, minus the size before it.
Prints medians over --repeat rounds and the ratios the targets refer to
(save <= 1.1x, verified resume <= 1.0x a raw read (issue 14), save peak memory <= torch.save's).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import torch
from torch import nn

import ladle


class PeakRSS:
    """Samples this process's RSS in a thread; `.extra` is the peak above the start value."""

    def __init__(self) -> None:
        self.process = psutil.Process()
        self.start = self.peak = 0
        self._stop = threading.Event()

    def __enter__(self) -> PeakRSS:
        self.start = self.peak = self.process.memory_info().rss
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.002)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)

    @property
    def extra(self) -> int:
        return self.peak - self.start


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


def timed(fn: Callable[[], object]) -> tuple[float, int]:
    with PeakRSS() as rss:
        start = time.perf_counter()
        fn()
        elapsed = time.perf_counter() - start
    return elapsed, rss.extra


def torch_save_fsync(model: nn.Module, optimizer: torch.optim.Optimizer, path: Path) -> None:
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, path)
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)


def raw_read(directory: Path) -> None:
    for file in sorted(directory.iterdir()):
        size = file.stat().st_size
        # Uninitialised memory, like a loader's fresh tensors (bytearray would zero-fill first).
        buffer = torch.empty(size, dtype=torch.uint8).numpy()
        with open(file, "rb", buffering=0) as handle:
            view = memoryview(buffer).cast("B")
            while view:
                got = handle.readinto(view)
                if not got:
                    break
                view = view[got:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=float, default=250e6)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where to write (default: a temp dir on /tmp's disk)")
    args = parser.parse_args()

    root = Path(args.dir or tempfile.mkdtemp(prefix="ladle-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    model, optimizer = build(args.params)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.0f}M fp32 parameters + AdamW state; writing under {root}")

    rows: dict[str, list[tuple[float, int]]] = {
        "torch.save+fsync": [],
        "ladle save": [],
        "raw read": [],
        "ladle resume (verify)": [],
        "ladle resume (no verify)": [],
    }
    size = 0
    try:
        for round_ in range(args.repeat):
            baseline = root / "baseline.pt"
            rows["torch.save+fsync"].append(timed(lambda b=baseline: torch_save_fsync(model, optimizer, b)))
            baseline.unlink()
            run = root / f"run{round_}"
            with ladle.CheckpointManager(run, model=model, optimizer=optimizer) as manager:
                rows["ladle save"].append(timed(lambda m=manager: m.save(step=1)))
                size = manager.latest.size
            checkpoint = run / "step-000000001"
            raw_read(checkpoint)  # page cache warm for every reader alike
            rows["raw read"].append(timed(lambda c=checkpoint: raw_read(c)))
            with ladle.CheckpointManager(run, model=model, optimizer=optimizer) as manager:
                rows["ladle resume (verify)"].append(timed(lambda m=manager: m.resume()))
                rows["ladle resume (no verify)"].append(timed(lambda m=manager: m.resume(verify=False)))
            shutil.rmtree(run)
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)

    print(f"checkpoint size: {size / 2**30:.2f} GiB; medians of {args.repeat} rounds")
    med = {
        k: (statistics.median(t for t, _ in v), statistics.median(m for _, m in v)) for k, v in rows.items()
    }
    print(f"{'operation':<26}{'seconds':>9}{'GiB/s':>8}{'peak extra RSS':>16}")
    for name, (seconds, extra) in med.items():
        print(f"{name:<26}{seconds:>9.2f}{size / 2**30 / seconds:>8.2f}{extra / 2**20:>12.0f} MiB")
    save_ratio = med["ladle save"][0] / med["torch.save+fsync"][0]
    mem_extra = (med["ladle save"][1] - med["torch.save+fsync"][1]) / 2**20
    resume_ratio = med["ladle resume (verify)"][0] / med["raw read"][0]
    fast_ratio = med["ladle resume (no verify)"][0] / med["raw read"][0]
    print(f"save time / torch.save+fsync:          {save_ratio:.2f}x (target <= 1.1x)")
    print(
        f"save peak memory minus torch.save's:    {mem_extra:+.0f} MiB (target <= 0, within sampling noise)"
    )
    print(f"resume (verify) time / raw read:        {resume_ratio:.2f}x (target <= 1.0x)")
    print(f"resume (no verify) time / raw read:     {fast_ratio:.2f}x")


if __name__ == "__main__":
    main()
