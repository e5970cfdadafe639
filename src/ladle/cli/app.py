"""The Typer application every command module registers on, and shared CLI helpers."""

from __future__ import annotations

import json
import sys
from typing import Any, NoReturn

import typer
from rich.console import Console

app = typer.Typer(
    name="ladle",
    help="Crash-safe PyTorch checkpoints: save, resume, keep, average and export.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)

console = Console()
err_console = Console(stderr=True)


def fail(message: str, code: int = 2) -> NoReturn:
    """Print a one-line error (no traceback) and exit; 2 means bad input."""
    err_console.print(f"ladle: error: {message}", markup=False, highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def print_json(data: Any) -> None:
    """Machine-readable output for --json: one JSON document on stdout."""
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


@app.callback()
def _root() -> None:
    """Crash-safe PyTorch checkpoints: save, resume, keep, average and export."""
