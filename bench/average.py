"""Averaging checkpoints of a large fp32 model: ladle (verifying every member) against the usual scripts.

    python bench/average.py [--params 64e6] [--members 5] [--repeat 3] [--dir DIR] [--keep] [--cold]

The default (5 checkpoints of 256 MB) runs in a few minutes on a small shared
machine; `--params 250e6 --members 10` is the large run (20 GB of temporary files).

Builds one ladle run of `--members` checkpoints (model.safetensors each) and a
torch-pickle copy of every checkpoint, then times, each in its own subprocess
(compiled bytecode cached, as an installed package has it) with the page cache
warmed by reading its inputs once (after the inputs' own write-back has finished,
and with the previous child's output removed and that removal committed), or with
`--cold` the page cache emptied before each child (root only; checkpoints written
hours ago are read from the disk):

  (a) stack:    torch.load every checkpoint, then torch.stack(...).mean(0) per key,
                torch.save (the approach common in tutorials);
  (b) fairseq:  torch.load one full checkpoint at a time and sum in place, divide in
                place, torch.save without fsync (what fairseq's
                scripts/average_checkpoints.py does);
  ladle soup:   ladle.soup(run, "last:N", output=...) over the run (safetensors;
                every member hashed in the same read as it is averaged and checked
                against its meta.json; provenance; atomic fsynced output);
  ladle avg:    ladle.average_to_file over the .pt copies (each hashed as it is read);
  ladle avg --no-hash: the same without hashing, to show what hashing costs;
  raw I/O:      reading every input file into one reused buffer, plus writing
                and fsyncing an output of the same size: the floor for any tool.

Peak RSS above baseline is the child's high-water mark (VmHWM) minus its RSS
after imports and a small warm-up, before any work. Approach (a) holds every checkpoint at once;
it is skipped (and says so) when the machine lacks the memory for it.
The approaches take turns, --repeat rounds of them ((a) only in the first
round: it is slow and needs the most memory), and the medians are reported, so
a burst of load on a shared machine does not decide the result. Prints times,
peak RSS and the ratios the targets refer to, with hashing on: ladle time
<= 0.6x of (b), ladle peak RSS above baseline <= 1.5x one checkpoint, ladle
time <= 1.3x the raw I/O time (reading the members, writing and fsyncing the output).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GIB = 1 << 30


def shapes(params: float) -> list[tuple[str, tuple[int, ...]]]:
    """A transformer-like layout of about `params` float32 parameters."""
    d = 1024
    per_layer = 12 * d * d + 13 * d
    # A quarter in the embedding and the output head (untied), the rest in layers.
    vocab = max(256, min(32000, int(params * 0.25 / (2 * d))))
    layers = max(1, round((params - 2 * vocab * d) / per_layer))
    out: list[tuple[str, tuple[int, ...]]] = [("embed.weight", (vocab, d))]
    for i in range(layers):
        p = f"layers.{i}."
        out += [
            (p + "attn.qkv.weight", (3 * d, d)),
            (p + "attn.qkv.bias", (3 * d,)),
            (p + "attn.out.weight", (d, d)),
            (p + "attn.out.bias", (d,)),
            (p + "mlp.up.weight", (4 * d, d)),
            (p + "mlp.up.bias", (4 * d,)),
            (p + "mlp.down.weight", (d, 4 * d)),
            (p + "mlp.down.bias", (d,)),
            (p + "norm1.weight", (d,)),
            (p + "norm1.bias", (d,)),
            (p + "norm2.weight", (d,)),
            (p + "norm2.bias", (d,)),
        ]
    out += [("norm.weight", (d,)), ("head.weight", (vocab, d))]
    return out


def make_inputs(root: Path, params: float, members: int) -> tuple[Path, list[Path], int]:
    import torch
    from safetensors.torch import save_file

    from ladle.store.run import Run

    layout = shapes(params)
    run = Run(root / "run", create=True).acquire()
    pt_files = []
    for i in range(members):
        gen = torch.Generator().manual_seed(i)
        state = {name: torch.randn(shape, generator=gen) for name, shape in layout}
        pending = run.begin(f"step-{(i + 1) * 1000:09d}")
        pending.write("model.safetensors", lambda p, s=state: save_file(s, p))
        pending.commit(step=(i + 1) * 1000, epoch=i, metrics={"val_loss": 1.0 / (i + 1)})
        pt = root / f"ckpt_{i + 1}.pt"
        torch.save(state, pt)
        pt_files.append(pt)
        del state
    run.release()
    size = sum(4 * _numel(shape) for _, shape in layout)
    return root / "run", pt_files, size


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def warm(paths: list[Path]) -> None:
    buf = bytearray(64 << 20)
    view = memoryview(buf)
    for path in paths:
        with open(path, "rb", buffering=0) as handle:
            while handle.readinto(view):
                pass


# -- the approaches, each run in a fresh interpreter --------------------------------------------------


def worker(approach: str, inputs: list[str], output: str) -> dict[str, float]:
    import io

    import psutil
    import torch

    import ladle

    # Warm the lazily loaded parts (kernels, thread pools, serialization) so the
    # baseline is the interpreter ready to work, not half-imported.
    warmup = torch.ones(1 << 16)
    warmup.add_(warmup, alpha=0.5).div_(3).sum()
    buffer = io.BytesIO()
    torch.save({"w": warmup}, buffer)
    buffer.seek(0)
    torch.load(buffer, weights_only=True)
    del warmup, buffer
    baseline = psutil.Process().memory_info().rss
    start = time.perf_counter()
    if approach == "stack":
        states = [torch.load(p, map_location="cpu", weights_only=True) for p in inputs]
        averaged = {k: torch.stack([s[k] for s in states]).mean(0) for k in states[0]}
        torch.save(averaged, output)
    elif approach == "fairseq":
        params: dict[str, torch.Tensor] = {}
        for p in inputs:
            state = torch.load(p, map_location="cpu", weights_only=True)
            for k, v in state.items():
                if k not in params:
                    params[k] = v.clone()
                else:
                    params[k] += v
            del state
        for v in params.values():
            v.div_(len(inputs))  # in place, as fairseq does
        torch.save(params, output)
    elif approach == "ladle-soup":
        ladle.soup(inputs[0], f"last:{int(inputs[1])}", output=output)
    elif approach == "ladle-avg":
        ladle.average_to_file(inputs, output)
    elif approach == "ladle-avg-nohash":
        ladle.average_to_file(inputs, output, hash_files=False)
    elif approach == "raw-io":
        buf = torch.empty(64 << 20, dtype=torch.uint8).numpy()
        view = memoryview(buf)
        total = 0
        for p in inputs[1:]:
            with open(p, "rb", buffering=0) as handle:
                while n := handle.readinto(view):
                    total += n
        size = int(inputs[0])
        fd = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            left = size
            while left:
                left -= os.write(fd, view[: min(left, len(view))])
            os.fsync(fd)
        finally:
            os.close(fd)
    else:
        raise SystemExit(f"unknown approach {approach}")
    seconds = time.perf_counter() - start
    # VmHWM is this process's own high-water mark; ru_maxrss from wait4 would also
    # count the parent's memory at fork time.
    return {"seconds": seconds, "baseline_rss": baseline, "peak_rss": _vm_hwm()}


def _vm_hwm() -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def child_env(root: Path) -> dict[str, str]:
    """The children's environment: compiled bytecode cached (in a folder under `root`, even
    where PYTHONDONTWRITEBYTECODE is set), as an installed package has it; compiling
    ladle's modules again in every child would add about 0.15 s to each ladle row."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = str(root / "pycache")
    subprocess.run(
        [sys.executable, "-c", "import ladle.averaging.front_doors, ladle.averaging.soups"],
        env=env,
        check=True,
    )
    return env


def run_child(approach: str, inputs: list[str], output: str, env: dict[str, str]) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--worker", approach, "--output", output, "--", *inputs]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout is not None
    out = proc.stdout.read()
    if proc.wait() != 0:
        raise SystemExit(f"{approach} failed with exit code {proc.returncode}")
    result = json.loads(out.strip().splitlines()[-1])
    result["peak_above_baseline"] = result["peak_rss"] - result["baseline_rss"]
    if os.path.exists(output):
        os.remove(output)
    side = output + ".json"
    if os.path.exists(side):
        os.remove(side)
    # Commit the removal now (on a file system mounted with `discard`, freeing 256 MB is a
    # trim the next journal commit waits for): else the next child's fsync pays for it.
    os.sync()
    return result


def drop_page_cache() -> bool:
    """Empty the kernel's page cache (root only, Linux); False when not allowed."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as handle:
            handle.write("3\n")
    except OSError:
        return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--params", type=float, default=64e6, help="parameters per checkpoint (fp32)")
    parser.add_argument("--members", type=int, default=5, help="checkpoints to average")
    parser.add_argument("--repeat", type=int, default=3, help="rounds; medians are reported")
    parser.add_argument("--dir", type=Path, default=None, help="work folder (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the generated checkpoints")
    parser.add_argument(
        "--cold",
        action="store_true",
        help="empty the page cache before each child instead of warming its inputs (needs root): "
        "checkpoints written hours ago are read from the disk",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    parser.add_argument("inputs", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.inputs, args.output)))
        return

    import psutil

    root = Path(tempfile.mkdtemp(prefix="ladle-bench-avg-", dir=args.dir))
    try:
        t0 = time.perf_counter()
        run_dir, pt_files, size = make_inputs(root, args.params, args.members)
        # The inputs were just written: without this their write-back (GBs) would run during
        # the first rounds and slow whichever approach it landed on.
        os.sync()
        st_files = sorted(run_dir.glob("step-*/model.safetensors"))
        print(
            f"{args.members} checkpoints of {size / 4 / 1e6:.0f}M fp32 parameters "
            f"({size / GIB:.2f} GiB each), made in {time.perf_counter() - t0:.0f} s; "
            f"torch {__import__('torch').__version__}, {os.cpu_count()} CPUs"
        )
        out = str(root / "out")
        env = child_env(root)
        plan = [
            ("(a) stack (torch.load all)", "stack", [str(p) for p in pt_files], pt_files),
            ("(b) fairseq (torch.load one at a time)", "fairseq", [str(p) for p in pt_files], pt_files),
            (
                "ladle soup (run, safetensors, verified)",
                "ladle-soup",
                [str(run_dir), str(args.members)],
                st_files,
            ),
            ("ladle avg (.pt files, hashed)", "ladle-avg", [str(p) for p in pt_files], pt_files),
            ("ladle avg (.pt files, --no-hash)", "ladle-avg-nohash", [str(p) for p in pt_files], pt_files),
            ("raw I/O (safetensors inputs)", "raw-io", [str(size), *map(str, st_files)], st_files),
            ("raw I/O (.pt inputs)", "raw-io", [str(size), *map(str, pt_files)], pt_files),
        ]
        runs: dict[str, list[dict[str, float]]] = {}
        for round_ in range(args.repeat):
            for label, approach, inputs, files in plan:
                if approach == "stack":
                    if round_ > 0:
                        continue
                    need = (args.members + 2) * size * 1.2
                    available = psutil.virtual_memory().available
                    if available < need + 2 * GIB:
                        print(
                            f"{label}: skipped, needs ~{need / GIB:.1f} GiB, {available / GIB:.1f} GiB available"
                        )
                        continue
                if not args.cold:
                    warm(files)
                elif not drop_page_cache():
                    raise SystemExit("--cold needs to write /proc/sys/vm/drop_caches (root, Linux)")
                suffix = ".safetensors" if approach.startswith("ladle") else ".pt"
                runs.setdefault(label, []).append(run_child(approach, inputs, out + suffix, env))
        results: dict[str, dict[str, float]] = {}
        for label, rounds in runs.items():
            results[label] = {
                "seconds": statistics.median(r["seconds"] for r in rounds),
                "peak_above_baseline": max(r["peak_above_baseline"] for r in rounds),
            }
            r = results[label]
            times = ", ".join(f"{x['seconds']:.2f}" for x in rounds)
            print(
                f"{label:42s} {r['seconds']:7.2f} s (median of {times})   peak RSS above baseline "
                f"{r['peak_above_baseline'] / GIB:5.2f} GiB ({r['peak_above_baseline'] / size:.2f}x one checkpoint)"
            )
        fairseq = results.get("(b) fairseq (torch.load one at a time)")
        for label, io_label in (
            ("ladle soup (run, safetensors, verified)", "raw I/O (safetensors inputs)"),
            ("ladle avg (.pt files, hashed)", "raw I/O (.pt inputs)"),
            ("ladle avg (.pt files, --no-hash)", "raw I/O (.pt inputs)"),
        ):
            r = results[label]
            parts = [f"{label}: "]
            if fairseq:
                parts.append(f"time {r['seconds'] / fairseq['seconds']:.2f}x of (b) (target <= 0.6x); ")
            parts.append(f"peak RSS {r['peak_above_baseline'] / size:.2f}x one checkpoint (target <= 1.5x); ")
            parts.append(
                f"{r['seconds'] / results[io_label]['seconds']:.2f}x the raw I/O time (target <= 1.3x)"
            )
            print("".join(parts))
    finally:
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
