"""Shared fixtures: small models built here, never downloaded."""

from __future__ import annotations

import gc
import importlib.util
import json
import os
import queue
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch
from torch import nn

if TYPE_CHECKING:
    from ladle.store.run import Run

from tests.s3_server import s3_bucket, s3_endpoint  # noqa: F401 - fixtures: a moto S3 server on 127.0.0.1

SCRIPTS = Path(__file__).parent / "scripts"

# Modules that need an optional extra are left out where it is not installed: `make test` also
# runs the fast tests on the oldest and newest supported Pythons, with no extras.
collect_ignore = [
    name
    for name, extra in (
        ("test_integration_lightning.py", "lightning"),
        ("test_integration_transformers.py", "transformers"),
    )
    if importlib.util.find_spec(extra) is None
]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def pytest_collection_finish(session: pytest.Session) -> None:
    """Move what collection imported (torch, transformers, ...) out of the garbage collector's
    reach: a full collection then walks only what the tests make. Trainer and accelerate call
    `gc.collect()` several times per `train()`, which otherwise walked millions of objects."""
    gc.collect()
    gc.freeze()


def scalar_run(tmp_path: Path, values: list[float]) -> Run:
    """A run at `tmp_path/run` with one checkpoint per value: `w` = [value], `n` = its index,
    at steps 100, 200, ... with `loss` = 1/index (averaging and provenance tests)."""
    from safetensors.torch import save_file

    from ladle.store.run import Run

    run = Run(tmp_path / "run", create=True).acquire()
    for i, v in enumerate(values, start=1):
        pending = run.begin(f"step-{i * 100:09d}")
        pending.write(
            "model.safetensors",
            lambda p, v=v, i=i: save_file({"w": torch.tensor([v]), "n": torch.tensor(i)}, p),
        )
        pending.commit(step=i * 100, epoch=i, metrics={"loss": 1.0 / i})
    run.release()
    return run


def tiny_model(seed: int = 0, hidden: int = 8) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, hidden), nn.ReLU(), nn.Dropout(0.1), nn.Linear(hidden, 2))


@pytest.fixture
def model() -> nn.Module:
    return tiny_model()


@pytest.fixture
def python() -> str:
    return sys.executable


def train_steps(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(5, 4, generator=generator)
        loss = model(x).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


class ScriptServer:
    """`main(argv)` of a test script run in forked children of one interpreter (`fork_server.py`).

    Starting Python and importing torch is most of what a subprocess test costs; the
    server pays it once, and every child is still a real process that can be killed.
    """

    def __init__(self, script: Path) -> None:
        self.process = subprocess.Popen(
            [sys.executable, str(SCRIPTS / "fork_server.py"), str(script)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self._lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        assert self.line(timeout=300) == "server ready"

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self._lines.put(line.rstrip("\n"))
        self._lines.put("server gone")

    def line(self, timeout: float = 120) -> str:
        """The next line a child (or the server) printed."""
        return self._lines.get(timeout=timeout)

    def start(self, *argv: str) -> int:
        """Fork a child running `main(argv)`; its pid."""
        assert self.process.stdin is not None
        self.process.stdin.write("run " + json.dumps(list(argv)) + "\n")
        self.process.stdin.flush()
        line = self.line()
        assert line.startswith("pid "), line
        return int(line.split()[1])

    def wait(self, timeout: float = 120) -> int:
        """The exit code of the running child (-9 after a SIGKILL), skipping its output."""
        return self._until_exit(timeout)[0]

    def _until_exit(self, timeout: float) -> tuple[int, list[str]]:
        printed = []
        while not (line := self.line(timeout)).startswith("exit "):
            assert line != "server gone", "the fork server died"
            printed.append(line)
        return int(line.split()[1]), printed

    def run(self, *argv: str) -> int:
        self.start(*argv)
        return self.wait()

    def run_capturing(self, *argv: str, timeout: float = 120) -> tuple[int, list[str]]:
        """Run `main(argv)` in a child to its end: its exit code and the lines it printed."""
        self.start(*argv)
        return self._until_exit(timeout)

    def close(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        self.process.wait(timeout=60)
        assert self.process.stdout is not None
        self.process.stdout.close()


@pytest.fixture(scope="session")
def fsdp_train() -> Iterator[ScriptServer]:
    """`tests/scripts/fsdp_train.py` (FSDP2 ranks, forked in turn) in forked children."""
    server = ScriptServer(SCRIPTS / "fsdp_train.py")
    yield server
    server.close()


@pytest.fixture(scope="session")
def train_tiny() -> Iterator[ScriptServer]:
    """`tests/scripts/train_tiny.py` in forked children (see `ScriptServer`)."""
    server = ScriptServer(SCRIPTS / "train_tiny.py")
    yield server
    server.close()
