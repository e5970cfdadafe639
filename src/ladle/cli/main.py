"""Entry point of the `ladle` console script: imports every command and maps errors to exit codes."""

from __future__ import annotations

import logging
import sys

import typer

# Command modules register themselves on `app` when imported.
from ladle.cli import commands  # noqa: F401  (import for registration)
from ladle.cli.app import app, err_console
from ladle.errors import LadleError


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; bad input exits 2 with one line, unexpected failures exit 1."""
    logging.basicConfig(level=logging.WARNING, format="ladle: %(message)s")
    try:
        command = typer.main.get_command(app)
        # Without standalone mode, typer.Exit(n) comes back as the return value.
        code = command.main(args=argv, prog_name="ladle", standalone_mode=False)
    except LadleError as exc:
        err_console.print(f"ladle: error: {exc}", markup=False, highlight=False, soft_wrap=True)
        return 2
    except typer.Exit as exc:
        return int(exc.exit_code or 0)
    except typer.TyperException as exc:
        exc.show()
        return int(getattr(exc, "exit_code", 2) or 2)
    except typer.Abort:
        err_console.print("ladle: aborted", markup=False)
        return 130
    except KeyboardInterrupt:
        return 130
    return code if isinstance(code, int) else 0


if __name__ == "__main__":
    sys.exit(main())
