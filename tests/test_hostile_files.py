"""Bounded work on hostile or huge files: every answer comes fast, in one line, without a traceback."""

from __future__ import annotations

import pickle
import signal
import subprocess
import sys
import warnings
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import ladle
from ladle.cli.main import main
from ladle.errors import FormatError, UnsafeLoad
from ladle.formats.source import TensorInfo, TensorSource
from ladle.store.run import Run


@contextmanager
def within(seconds: float) -> Iterator[None]:
    """Fail (instead of hanging for minutes) when the block takes longer than `seconds`."""

    def expired(signum: int, frame: object) -> None:
        raise TimeoutError(f"took longer than {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def pickle_bomb(path: Path, levels: int = 40, value: float = 1.0) -> Path:
    """2 KiB that describe 2^40 paths to one tensor: each level references the previous twice."""
    inner: dict = {"w": torch.full((2,), value)}
    for _ in range(levels):
        inner = {"a": inner, "b": inner}
    torch.save({"state_dict": inner}, path)
    assert path.stat().st_size < 4096
    return path


def deep_file(path: Path, levels: int = 5000) -> Path:
    """A torch file holding {"state_dict": {"x": {"x": ... {"w": tensor}}}}, `levels` dicts deep.

    Its pickle is written opcode by opcode (`torch.save` of so deep an object hits the
    interpreter's C recursion limit on Python 3.12+): torch saves two levels, and the
    middle one is repeated, an EMPTY_DICT + key before the value, a SETITEM after it.
    """
    torch.save({"state_dict": {"x": {"w": torch.ones(2)}}}, path)
    with zipfile.ZipFile(path) as archive:
        entries = [(info, archive.read(info)) for info in archive.infolist()]
    key = b"X\x01\x00\x00\x00xq\x03"  # BINUNICODE 'x', BINPUT 3: the key of the middle level
    rebuilt = []
    for info, data in entries:
        if info.filename.endswith("/data.pkl"):
            assert data.count(key) == 1 and data.endswith(b"sss."), data
            at = data.index(key) + len(key)
            data = (
                data[:at]
                + b"}X\x01\x00\x00\x00x" * (levels - 1)
                + data[at:-4]
                + b"s" * (levels - 1)
                + b"sss."
            )
        rebuilt.append((info, data))
    with zipfile.ZipFile(path, "w") as archive:
        for info, data in rebuilt:
            archive.writestr(info, data)
    return path


def test_a_pickle_bomb_is_read_in_a_moment(tmp_path: Path) -> None:
    bomb = pickle_bomb(tmp_path / "bomb.pt")
    with within(10):
        with ladle.load_source(bomb) as source:
            assert len(source) == 1
        assert len(ladle.inspect_checkpoint(bomb).tensors) == 1
        assert ladle.diff_checkpoints(bomb, bomb).identical == 1


def test_a_pickle_bomb_averages_and_exports_in_a_moment(tmp_path: Path, capsys) -> None:
    bomb = pickle_bomb(tmp_path / "bomb.pt")
    other = pickle_bomb(tmp_path / "other.pt", value=3.0)
    with within(10):
        assert main(["export", str(bomb), "-o", str(tmp_path / "w.safetensors")]) == 0
        assert main(["avg", str(bomb), str(other), "-o", str(tmp_path / "avg.safetensors")]) == 0
    capsys.readouterr()
    with ladle.load_source(tmp_path / "avg.safetensors") as source:
        assert [t.tolist() for t in source.state_dict().values()] == [[2.0, 2.0]]


def test_nesting_thousands_deep_is_one_line_not_a_recursion_error(tmp_path: Path) -> None:
    deep = deep_file(tmp_path / "deep.pt")
    with pytest.raises(FormatError, match=r"deep\.pt: nested more than 64 levels deep") as caught:
        ladle.load_source(deep, key="state_dict")
    assert "\n" not in str(caught.value)
    with pytest.raises(FormatError):
        ladle.load_source(deep)
    with pytest.raises(FormatError):
        ladle.inspect_checkpoint(deep)


def test_the_cli_answers_a_deep_file_with_one_line(tmp_path: Path, capsys) -> None:
    deep = deep_file(tmp_path / "deep.pt")
    for command in (
        ["diff", deep, deep],
        ["inspect", deep],
        ["avg", deep, deep, "-o", tmp_path / "o.safetensors"],
    ):
        assert main([str(a) for a in command]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "deep.pt" in err, command


class CountingSource(TensorSource):
    """A source that counts how often its names are listed."""

    format = "test"

    def __init__(self, n: int) -> None:
        super().__init__()
        self.path = "<counting>"
        self._names = [f"t{i}" for i in range(n)]
        self.listings = 0

    def keys(self) -> list[str]:
        self.listings += 1
        return list(self._names)

    def info(self, key: str) -> TensorInfo:
        self._require(key)
        return TensorInfo(torch.Size([1]), torch.float32)

    def tensor(self, key: str) -> torch.Tensor:
        self._require(key)
        return torch.zeros(1)


def test_membership_tests_list_the_names_once_not_once_per_tensor() -> None:
    source = CountingSource(2000)
    for name in list(source):
        source.info(name)
        assert name in source
    assert "missing" not in source
    assert source.listings <= 2


def test_inspect_of_many_tensors_stays_linear(tmp_path: Path) -> None:
    save_file({f"layer.{i}.w": torch.full((2,), float(i)) for i in range(20_000)}, tmp_path / "a.safetensors")
    with within(20):  # quadratic code took more than a minute at this size
        assert len(ladle.inspect_checkpoint(tmp_path / "a.safetensors").tensors) == 20_000


def test_a_plain_pickle_is_one_line_and_no_torch_warning(tmp_path: Path) -> None:
    path = tmp_path / "plain.pt"
    path.write_bytes(pickle.dumps({"w": [1.0, 2.0]}))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(
            UnsafeLoad, match=r"plain\.pt: a plain pickle \(pickle\.dump\), not a file torch\.save"
        ):
            ladle.load_source(path)
        with pytest.raises(UnsafeLoad, match="a plain pickle"):
            ladle.load_source(path, trust=True)
    assert [str(w.message) for w in caught] == []


@pytest.mark.slow
def test_the_cli_prints_only_ladles_line_for_a_plain_pickle(tmp_path: Path) -> None:
    path = tmp_path / "plain.pt"
    path.write_bytes(pickle.dumps({"w": [1.0, 2.0]}))
    result = subprocess.run(
        [sys.executable, "-m", "ladle.cli.main", "export", str(path), "-o", str(tmp_path / "o.safetensors")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "UserWarning" not in result.stderr


def unsafe_state_checkpoint(tmp_path: Path, model: torch.nn.Module) -> Path:
    """A committed checkpoint (checksums valid) whose state.pt needs full unpickling."""
    with ladle.CheckpointManager(tmp_path / "run", model=model) as manager:
        info = manager.save(1)
    run = Run(tmp_path / "run").acquire()
    pending = run.begin("step-000000002")
    for name in info.files:
        if name == "state.pt":
            pending.write(name, lambda p: torch.save({"format": "x", "odd": Fraction(1, 3)}, p))
        else:
            source = Path(info.file(name))
            pending.write(name, lambda p, source=source: Path(p).write_bytes(source.read_bytes()))
    pending.commit(step=2, extra=info.extra)
    run.release()
    return tmp_path / "run"


def test_an_unsafe_state_file_is_reported_without_terminal_escape_codes(tmp_path: Path, model) -> None:
    run_dir = unsafe_state_checkpoint(tmp_path, model)
    problems = Run(run_dir).verify("step-000000002")
    assert len(problems) == 1 and "state.pt: cannot be loaded" in problems[0]
    assert "\x1b" not in problems[0] and "\n" not in problems[0]
    with ladle.CheckpointManager(run_dir, model=model) as manager:
        with pytest.raises(ladle.CorruptCheckpoint) as caught:
            manager.resume("step-000000002")
    assert "\x1b" not in str(caught.value) and "\n" not in str(caught.value)
