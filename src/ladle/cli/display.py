"""Small formatters shared by the inspection commands' tables (sizes, times, numbers)."""

from __future__ import annotations

import math
import time
from typing import Any

from rich.console import Console
from rich.table import Table


def human_bytes(n: int | float) -> str:
    """1536 -> "1.5 KiB": sizes for people (binary units, as `ls -h` and `du -h`)."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"  # pragma: no cover - the loop always returns


def local_time(seconds: float) -> str:
    """A Unix time as local "YYYY-MM-DD HH:MM:SS"."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seconds))


def number(value: Any) -> str:
    """A metric value, short: 6 significant digits; non-numbers as they are."""
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.6g}" if math.isfinite(value) else str(value)
    return str(value)


def scientific(value: float | None) -> str:
    """A distance or difference: 3 significant digits in scientific notation."""
    if value is None:
        return "-"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return f"{value:.3e}"


def print_table(console: Console, table: Table) -> None:
    """Print a table at the terminal's width, or roomy when piped (no squeezed columns)."""
    if console.is_terminal:
        console.print(table)
    else:
        # Console.print cannot go wider than the console, so lay out on a wide one.
        wide = Console(file=console.file, width=max(console.width, 200), highlight=False)
        wide.print(table)


def examples(*commands: str, footer: str | None = None) -> str:
    """A --help epilog: one example command per line, then an optional note (exit codes)."""
    text = "[bold]Examples[/bold]\n\n" + "\n\n".join(f"  {c}" for c in commands)
    return text + (f"\n\n{footer}" if footer else "")
