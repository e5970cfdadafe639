"""Sharded saves on 2 CPU ranks (gloo, FSDP2) against gathering onto rank 0; `ladle avg` over DCP.

    python bench/sharded.py [--params 25e6] [--saves 3] [--rounds 3] [--dir DIR [--keep]]

1. Save: a `CheckpointManager` sharded save (every rank writes its DCP shards, fsyncs
   and hashes them; rank 0 commits) against gathering the full state onto rank 0
   (`get_state_dict(full_state_dict=True, cpu_offload=True)`) and writing it there
   as a non-sharded checkpoint would be written (safetensors weights + torch.save'd
   optimizer, fsync, sha256). Times are rank 0's, call to return, medians.
2. Averaging: `ladle avg` over the --saves sharded checkpoints (read tensor by tensor
   through DCP) against `ladle avg` over the same checkpoints exported to safetensors
   (`ladle export`): wall time and peak resident memory of the CLI process, medians of
   --rounds alternating rounds after a warm-up (target: DCP <= 1.3x the time, peak memory
   about one model); then the same averages inside this process (`ladle.average`), which
   leaves out the interpreter's and torch's start that dominates a CLI run.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import ladle


def build(params: float, world: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    width = 2048
    layers = max(1, round(params / (width * width + width)))
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)])
    mesh = init_device_mesh("cpu", (world,))
    for layer in model:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model(torch.randn(2, width)).sum().backward()
    optimizer.step()
    return model, optimizer


def _fsync_and_hash(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(8 << 20):
            digest.update(chunk)
        os.fsync(handle.fileno())
    return digest.hexdigest()


def gather_and_save(model: nn.Module, optimizer: torch.optim.Optimizer, folder: Path) -> None:
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    weights, optim = get_state_dict(
        model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    if dist.get_rank() == 0:
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in weights.items()}, str(folder / "model.safetensors"))
        torch.save(optim, folder / "state.pt")
        for name in ("model.safetensors", "state.pt"):
            _fsync_and_hash(str(folder / name))
    dist.barrier()


def worker(rank: int, args: argparse.Namespace, init: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=2)
    model, optimizer = build(args.params, 2)
    root = Path(args.root)
    sharded, gathered = [], []
    with ladle.CheckpointManager(root / "run", model=model, optimizer=optimizer) as manager:
        for step in range(1, args.saves + 1):
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(0.01)
            dist.barrier()
            t0 = time.perf_counter()
            manager.save(step=step)
            sharded.append(time.perf_counter() - t0)
            dist.barrier()
            t0 = time.perf_counter()
            gather_and_save(model, optimizer, root / f"gathered-{step}")
            gathered.append(time.perf_counter() - t0)
    if rank == 0:
        size = ladle.Run(root / "run").latest().size  # type: ignore[union-attr]
        with open(out, "w") as handle:
            handle.write(f"{statistics.median(sharded)} {statistics.median(gathered)} {size}\n")
    dist.destroy_process_group()


def peak_run(argv: list[str]) -> tuple[float, int]:
    """Wall time and peak RSS (bytes) of a subprocess, sampled every 5 ms."""
    t0 = time.perf_counter()
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    watched = psutil.Process(process.pid)
    peak = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            try:
                peak = max(peak, watched.memory_info().rss)
            except psutil.NoSuchProcess:
                return
            time.sleep(0.005)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    _, err = process.communicate()
    done.set()
    thread.join()
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed: {err.decode()[-2000:]}")
    return time.perf_counter() - t0, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=float, default=25e6)
    parser.add_argument("--saves", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds of each average (medians)")
    parser.add_argument("--dir", default=None)
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints in --dir afterwards")
    args = parser.parse_args()
    root = Path(args.dir or tempfile.mkdtemp(prefix="ladle-bench-sharded-"))
    args.root = str(root)
    out = root / "times.txt"
    try:
        mp.start_processes(worker, args=(args, str(root / "init"), str(out)), nprocs=2, start_method="fork")
        sharded, gathered, size = out.read_text().split()
        print(f"checkpoint: {int(size) / 1e6:.0f} MB (weights + AdamW state), 2 ranks")
        print(f"sharded save (every rank writes)   median {float(sharded):.2f} s")
        print(f"gather onto rank 0 + save there    median {float(gathered):.2f} s")
        print(f"sharded / gathered: {float(sharded) / float(gathered):.2f}x")

        ladle_cli = [sys.executable, "-m", "ladle.cli.main"]
        run = ladle.Run(root / "run")
        members = [c.path for c in run.checkpoints()]
        exported = []
        for i, path in enumerate(members):
            target = root / f"export-{i}.safetensors"
            subprocess.run([*ladle_cli, "export", path, "-o", str(target)], check=True, capture_output=True)
            exported.append(str(target))
        model_bytes = os.path.getsize(exported[0])
        # A first round warms the page cache for both alike; then rounds alternate the two
        # and the medians are reported (the machine this ran on is shared and noisy).
        runs: dict[str, list[tuple[float, int]]] = {"dcp": [], "st": []}
        for _ in range(1 + args.rounds):
            runs["dcp"].append(
                peak_run([*ladle_cli, "avg", *members, "-o", str(root / "a.safetensors"), "--force"])
            )
            runs["st"].append(
                peak_run([*ladle_cli, "avg", *exported, "-o", str(root / "b.safetensors"), "--force"])
            )
        dcp_time, st_time = (statistics.median(t for t, _ in runs[k][1:]) for k in ("dcp", "st"))
        dcp_peak, st_peak = (max(p for _, p in runs[k][1:]) for k in ("dcp", "st"))
        print(
            f"ladle avg of {len(members)} members, model {model_bytes / 1e6:.0f} MB, median of {args.rounds}:"
        )
        print(f"  over DCP checkpoints     {dcp_time:.2f} s, peak RSS {dcp_peak / 1e6:.0f} MB")
        print(f"  over safetensors exports {st_time:.2f} s, peak RSS {st_peak / 1e6:.0f} MB")
        print(f"  DCP / safetensors: {dcp_time / st_time:.2f}x time (target <= 1.3x)")
        # The same averages in this process, without the interpreter's and torch's start.
        inside: dict[str, list[float]] = {"dcp": [], "st": []}
        for _ in range(args.rounds):
            for name, inputs in (("dcp", members), ("st", exported)):
                t0 = time.perf_counter()
                ladle.average(inputs)
                inside[name].append(time.perf_counter() - t0)
        dcp_in, st_in = (statistics.median(inside[k]) for k in ("dcp", "st"))
        print(
            f"  in one process (ladle.average): DCP {dcp_in:.2f} s, safetensors {st_in:.2f} s, "
            f"{dcp_in / st_in:.2f}x"
        )
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
