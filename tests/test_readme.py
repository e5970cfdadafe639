"""The README's Python code blocks run as written (in a scratch directory)."""

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
