"""`inspect` and `diff` on checkpoints with very many small tensors (large MoE models).

    python bench/many_tensors.py [--tensors 100000] [--repeat 3] [--dir DIR]

Writes two safetensors files of N tiny tensors each (4 float32 values; the two
files differ in one tensor in ten), then times `ladle.inspect_checkpoint()` and
`ladle.diff_checkpoints()` in this process, and `ladle inspect` / `ladle diff`
as subprocesses (interpreter start and imports included), at N and N/10 so the
growth with the tensor count shows: linear work grows 10x, quadratic work 100x.
Each row gives the median wall time and the median CPU time (user plus system),
which depends much less on what else the machine runs. Compiled bytecode is cached
for the subprocesses (even where PYTHONDONTWRITEBYTECODE is set), as an installed
package has it. Target: each under 2 s at 100,000 tensors on a quiet machine.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file

import ladle


def write_pair(folder: Path, n: int) -> tuple[Path, Path]:
    generator = torch.Generator().manual_seed(n)
    a = {f"layers.{i // 64}.experts.{i % 64}.w": torch.randn(4, generator=generator) for i in range(n)}
    b = {k: (v + 1 if i % 10 == 0 else v) for i, (k, v) in enumerate(a.items())}
    pa, pb = folder / f"a-{n}.safetensors", folder / f"b-{n}.safetensors"
    save_file(a, pa)
    save_file(b, pb)
    return pa, pb


def timed(fn: Callable[[], object], repeat: int) -> tuple[float, float]:
    """Median wall and CPU seconds of `fn()` (CPU of this process and of its children)."""
    walls, cpus = [], []
    for _ in range(repeat):
        before, children = time.process_time(), resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        fn()
        walls.append(time.perf_counter() - start)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        child = after.ru_utime - children.ru_utime + after.ru_stime - children.ru_stime
        cpus.append(time.process_time() - before + child)
    return statistics.median(walls), statistics.median(cpus)


def cli(env: dict[str, str], *args: str) -> Callable[[], object]:
    command = [sys.executable, "-m", "ladle.cli.main", *args]

    def run() -> None:
        # `ladle diff` exits 1 when the files differ, like diff(1).
        code = subprocess.run(command, stdout=subprocess.DEVNULL, env=env).returncode
        if code not in (0, 1):
            raise SystemExit(f"{' '.join(command)} exited {code}")

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tensors", type=float, default=10_000, help="tensors per file (default 10000)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where to write the files (default: a temp dir)")
    args = parser.parse_args()
    n = int(args.tensors)
    folder = Path(tempfile.mkdtemp(prefix="ladle-bench-", dir=args.dir))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env.update(COLUMNS="120", PYTHONPYCACHEPREFIX=str(folder / "pycache"))
    results: dict[tuple[int, str], tuple[float, float]] = {}
    try:
        print(f"{'tensors':>8} {'operation':<14} {'wall':>8} {'CPU':>8}")
        for count in (n // 10, n):
            a, b = write_pair(folder, count)
            rows = [
                ("inspect (API)", lambda a=a: ladle.inspect_checkpoint(a)),
                ("diff (API)", lambda a=a, b=b: ladle.diff_checkpoints(a, b)),
                ("ladle inspect", cli(env, "inspect", str(a))),
                ("ladle diff", cli(env, "diff", str(a), str(b))),
            ]
            for label, fn in rows:
                fn()  # once unmeasured: bytecode compiled, files in the page cache
                wall, cpu = timed(fn, args.repeat)
                results[count, label] = wall, cpu
                print(f"{count:>8} {label:<14} {wall:>7.2f}s {cpu:>7.2f}s", flush=True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    labels = [label for count, label in results if count == n]
    worst = max(results[n, label][0] for label in labels)
    growth = ", ".join(
        f"{label} {results[n, label][1] / max(results[n // 10, label][1], 1e-9):.1f}x" for label in labels
    )
    print(f"CPU growth for 10x the tensors (10x is linear): {growth}")
    print(
        f"target: each under 2 s (wall) at {n:,} tensors on a quiet machine: slowest {worst:.2f} s, "
        f"{'met' if worst < 2 else 'NOT met'} (load average now {os.getloadavg()[0]:.1f})"
    )


if __name__ == "__main__":
    main()
