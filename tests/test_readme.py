"""The README's Python code blocks run as written, and the outputs it shows are what the code prints."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).parent.parent / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_the_readme_has_python_examples() -> None:
    assert python_blocks()


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(python_blocks())))
def test_readme_block_runs(tmp_path: Path, index: int) -> None:
    code = python_blocks()[index]
    script = tmp_path / f"block{index}.py"
    script.write_text(code)
    env = {**os.environ, "MPLBACKEND": "Agg"}
    for attempt in range(2):  # a second run resumes the first
        result = subprocess.run(
            [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env
        )
        assert result.returncode == 0, f"run {attempt}: {result.stderr[-2000:]}"


@pytest.mark.slow
def test_the_outputs_the_readme_shows_are_what_the_code_prints() -> None:
    """`python scripts/readme_outputs.py --demo --write` regenerates them when this fails."""
    sys.path.insert(0, str(README.parent / "scripts"))
    try:
        import readme_outputs
    finally:
        sys.path.pop(0)
    text = README.read_text()
    fresh = readme_outputs.regenerate(text, demo=True)
    assert readme_outputs.stale_blocks(text, fresh) == []


def test_the_demo_block_is_compared_by_its_shape_not_its_figures() -> None:
    # Its figures come from 30 epochs of training and differ between machines; its rows,
    # columns and recipes are the code's.
    sys.path.insert(0, str(README.parent / "scripts"))
    try:
        import readme_outputs
    finally:
        sys.path.pop(0)
    shown = "$ make demo\nlast checkpoint           1        1     91.39%     0.3806   loses (-14)\n"
    other_machine = "$ make demo\nlast checkpoint           1        1     90.83%     0.3772   beats (+2)\n"
    renamed = "$ make demo\nfinal checkpoint          1        1     91.39%     0.3806   loses (-14)\n"
    assert readme_outputs.normalize(shown) == readme_outputs.normalize(other_machine)
    assert readme_outputs.normalize(shown) != readme_outputs.normalize(renamed)
    # Other blocks keep every figure.
    assert readme_outputs.normalize("val_loss=0.1790") != readme_outputs.normalize("val_loss=0.1791")
