"""Opening a run of many checkpoints: `ladle.Run(path)` reads every meta.json (the index is never trusted).

    python bench/run_open.py [--checkpoints 1000] [--repeat 5] [--dir DIR]

Writes a run of N committed checkpoints (tiny files, real sealed meta.json
markers, one index), then times `Run(path)` (listing, reading and checking the
seal of every meta.json) and `ladle ls` as a subprocess. Target: `ladle ls` of
1,000 checkpoints well under 0.3 s on a quiet machine (interpreter start aside).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time

from ladle.store.checkpoint import CheckpointInfo, FileRecord
from ladle.store.run import Run


def write_run(root: str, count: int) -> None:
    for step in range(1, count + 1):
        name = f"step-{step:09d}"
        folder = os.path.join(root, name)
        os.makedirs(folder)
        files = {}
        for filename in ("model.safetensors", "state.pt"):
            data = os.urandom(64)
            with open(os.path.join(folder, filename), "wb") as handle:
                handle.write(data)
            files[filename] = FileRecord(len(data), hashlib.sha256(data).hexdigest())
        info = CheckpointInfo(
            name=name,
            path=folder,
            step=step,
            epoch=step // 10,
            time=time.time(),
            metrics={"loss": 1.0 / step, "val_loss": 2.0 / step},
            files=files,
            monitor={"metric": "val_loss", "mode": "min"},
            seq=step,
            extra={"models": ["model"], "epoch_complete": False, "history_len": step},
        )
        with open(os.path.join(folder, "meta.json"), "wb") as handle:
            handle.write(info.meta_bytes())
    Run(root).acquire().release()  # writes the index


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoints", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--dir", default=None)
    args = parser.parse_args()
    root = tempfile.mkdtemp(prefix="ladle-bench-", dir=args.dir)
    try:
        run_dir = os.path.join(root, "run")
        write_run(run_dir, args.checkpoints)
        opens, lists = [], []
        for _ in range(args.repeat):
            start = time.perf_counter()
            assert len(Run(run_dir)) == args.checkpoints
            opens.append(time.perf_counter() - start)
            start = time.perf_counter()
            subprocess.run(
                [sys.executable, "-m", "ladle.cli.main", "ls", run_dir], check=True, capture_output=True
            )
            lists.append(time.perf_counter() - start)
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import ladle.cli.main"], check=True)
        startup = time.perf_counter() - start
        print(f"checkpoints: {args.checkpoints}; best of {args.repeat}")
        print(f"Run(path)                 {min(opens):6.3f} s")
        print(f"ladle ls (subprocess)     {min(lists):6.3f} s")
        print(f"  of which interpreter + CLI import {startup:6.3f} s")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
