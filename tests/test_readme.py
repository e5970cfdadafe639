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
