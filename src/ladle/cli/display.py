"""Small formatters shared by the inspection commands' tables (sizes, times, numbers)."""

from __future__ import annotations

import math
import os
import shutil
import sys
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # rich is imported where a table is drawn, not at start-up
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


def output_width(console: Console | None = None) -> int:
    """The width to lay tables out in: $COLUMNS, else the terminal's, else roomy (200) when piped."""
    columns = os.environ.get("COLUMNS", "")
    if columns.isdigit() and int(columns) > 0:
        return int(columns)
    if console is not None:
        return console.width if console.is_terminal else max(console.width, 200)
    if sys.stdout.isatty():
        return shutil.get_terminal_size().columns
    return 200


def print_table(console: Console, table: Table, *, squeeze: bool = True) -> None:
    """Print a table within the output width (see `output_width`).

    `squeeze=False`: never narrow a column (no `…`); a table wider than the width
    overflows instead (the caller chose its columns to fit).
    """
    from rich.console import Console

    width = output_width(console)
    if not squeeze:
        width = max(width, Console(width=10_000).measure(table).maximum)
    # Console.print cannot go wider than the console, so lay out on one of the chosen width.
    sized = Console(file=console.file, width=width, highlight=False)
    sized.print(table)


def box_table(headers: list[str], rows: list[list[str]], *, left: set[str]) -> str:
    """A table drawn like rich's default box, computed directly (no rich, linear in the rows).

    For long listings (`ladle ls` of a 1,000-checkpoint run) where rich's layout costs
    more than the rest of the command; columns are as wide as their widest cell, never cut.
    """
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]

    def line(cells: list[str], bar: str) -> str:
        padded = [
            c.ljust(w) if h in left else c.rjust(w) for c, w, h in zip(cells, widths, headers, strict=True)
        ]
        return bar + bar.join(f" {c} " for c in padded) + bar

    def rule(start: str, middle: str, end: str, fill: str) -> str:
        return start + middle.join(fill * (w + 2) for w in widths) + end

    out = [rule("┏", "┳", "┓", "━"), line(headers, "┃"), rule("┡", "╇", "┩", "━")]
    out += [line(r, "│") for r in rows]
    out.append(rule("└", "┴", "┘", "─"))
    return "\n".join(out)


def examples(*commands: str, footer: str | None = None) -> str:
    """A --help epilog: one example command per line, then an optional note (exit codes).

    The `\\b` line tells click to keep the examples' lines as they are (no rewrapping).
    """
    text = "Examples:\n\n\b\n" + "\n".join(f"  {c}" for c in commands)
    return text + (f"\n\n{footer}" if footer else "")
