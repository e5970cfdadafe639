"""Start-up time of the daily commands against `python -c pass`, in one run.

    python bench/cli_startup.py [--checkpoints 1000] [--repeat 7] [--dir DIR]

Times, as fresh processes (median of --repeat): `python -c pass`, `python -c
"import torch"` (what every command paid before the CLI imported lazily),
`ladle --help`, `ladle version`, `ladle ls RUN` and `ladle verify --quick RUN`
on a run of --checkpoints checkpoints (a tiny model, so that the time is the
CLI's and the index's, not the disk's), then `ladle inspect` of one
model.safetensors and of the run's latest checkpoint (its state.pt described
from a pickle scan) and a full `ladle verify` of one checkpoint: none of these
imports torch. The run is made once with the CheckpointManager and kept in --dir
for later rounds. The target: each light command within 0.3 s on a quiet machine.

Compiled bytecode is cached (in a temporary PYTHONPYCACHEPREFIX, even where
PYTHONDONTWRITEBYTECODE is set), and each command runs once unmeasured first, as
an installed package would run: compiling ladle's modules again on every start
would add about 0.1 s.
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
from pathlib import Path


def make_run(path: Path, checkpoints: int) -> None:
    """A run of `checkpoints` committed checkpoints of a tiny model, with two metrics each."""
    import torch

    from ladle import CheckpointManager

    if (path / "ladle.json").exists():
        return
    model = torch.nn.Linear(4, 2)
    with CheckpointManager(str(path), model=model, monitor="val_loss") as manager:
        for step in range(1, checkpoints + 1):
            manager.save(step=step, metrics={"val_loss": 1.0 / step, "acc": step / checkpoints})


def seconds(argv: list[str], repeat: int, env: dict[str, str]) -> tuple[float, float]:
    """Median wall time and median CPU time (user + system) of running `argv` to completion.

    The CPU time hardly depends on what else the machine runs; the wall time does.
    """
    walls, cpus = [], []
    subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True, env=env)
    for _ in range(repeat):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True, env=env)
        walls.append(time.perf_counter() - start)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpus.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    return statistics.median(walls), statistics.median(cpus)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--checkpoints", type=int, default=100, help="checkpoints in the run (1000 for the record)"
    )
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--dir", default=None, help="where to keep the run (default: a temporary folder)")
    args = parser.parse_args()

    base = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="ladle-cli-bench-"))
    run = base / f"run-{args.checkpoints}"
    start = time.perf_counter()
    make_run(run, args.checkpoints)
    made = time.perf_counter() - start
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env.update(COLUMNS="120", PYTHONPYCACHEPREFIX=str(base / "pycache"))
    one = run / "step-000000001"
    script = Path(sys.executable).parent / "ladle"
    ladle = [str(script)] if script.exists() else [sys.executable, "-m", "ladle.cli.main"]
    cases = {
        "python -c pass": [sys.executable, "-c", "pass"],
        "python -c 'import torch'": [sys.executable, "-c", "import torch"],
        "ladle --help": [*ladle, "--help"],
        "ladle version": [*ladle, "version"],
        f"ladle ls RUN ({args.checkpoints} checkpoints)": [*ladle, "ls", str(run)],
        f"ladle verify --quick RUN ({args.checkpoints})": [*ladle, "verify", "--quick", str(run)],
        "ladle inspect CKPT/model.safetensors": [*ladle, "inspect", str(one / "model.safetensors")],
        "ladle inspect RUN/latest (a checkpoint)": [*ladle, "inspect", f"{run}/latest"],
        "ladle verify CKPT (full, one checkpoint)": [*ladle, "verify", str(one)],
    }
    print(f"run of {args.checkpoints} checkpoints made in {made:.1f} s; median of {args.repeat} runs each")
    print(f"{'':<44} {'wall':>8}   {'CPU':>8}")
    for label, argv in cases.items():
        wall, cpu = seconds(argv, args.repeat, env)
        print(f"{label:<44} {wall:6.3f} s   {cpu:6.3f} s")
    if args.dir:
        shutil.rmtree(base / "pycache", ignore_errors=True)
    else:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
