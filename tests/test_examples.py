"""The examples in examples/ run and say what they promise."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).parent.parent / "examples"


@pytest.mark.slow
def test_interrupt_resume_example_resumes_bit_exactly() -> None:
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "interrupt_resume.py")], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "resumed run == uninterrupted run, bit for bit: True" in result.stdout
