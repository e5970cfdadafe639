"""Entry point of the `ladle` console script: runs a command and maps failures to exit codes.

Exit status: 0 success, 2 bad input, 1 a failure of the environment (disk full,
permission denied, a store out of reach, a missing optional package); each as one
line on stderr, never a traceback. Only a bug in ladle itself shows a traceback.
"""

from __future__ import annotations

import errno
import logging
import sys

import typer

from ladle.cli.app import app, say
from ladle.errors import LadleError, MissingDependency, RunLocked, StorageError, WriteFailed

# Errors about the machine rather than about what the user typed.
ENVIRONMENT_ERRORS = (WriteFailed, StorageError, RunLocked, MissingDependency)
_OS_HINTS = {
    errno.ENOSPC: "free some space and run it again",
    errno.EDQUOT: "free some space (disk quota) and run it again",
    errno.EACCES: "check the permissions, or choose another path",
    errno.EPERM: "check the permissions, or choose another path",
    errno.EROFS: "the file system is read-only; choose another path",
}


def main(argv: list[str] | None = None) -> int:
    """Run the CLI and return its exit status."""
    if not logging.root.handlers:
        handler = StderrHandler()
        handler.setFormatter(logging.Formatter("ladle: %(message)s"))
        logging.root.addHandler(handler)
        logging.root.setLevel(logging.WARNING)
    try:
        command = _group()
        # Without standalone mode, typer.Exit(n) comes back as the return value.
        code = command.main(args=argv, prog_name="ladle", standalone_mode=False)
    except LadleError as exc:
        say(f"ladle: error: {exc}", err=True)
        return 1 if isinstance(exc, ENVIRONMENT_ERRORS) else 2
    except OSError as exc:
        say(f"ladle: error: {os_error_line(exc)}", err=True)
        return 1
    except ImportError as exc:
        # fsspec names the package a URL needs ("Install s3fs to access S3"); others are bugs.
        if "install" not in str(exc).lower():
            raise
        say(f"ladle: error: {exc} (pip install it, then run again)", err=True)
        return 1
    except typer.Exit as exc:
        return int(exc.exit_code or 0)
    except typer.TyperException as exc:
        exc.show()
        return int(getattr(exc, "exit_code", 2) or 2)
    except typer.Abort:
        say("ladle: aborted", err=True)
        return 130
    except KeyboardInterrupt:
        return 130
    return code if isinstance(code, int) else 0


_GROUP: typer.core.TyperGroup | None = None


def _group() -> typer.core.TyperGroup:
    """The click group, built once per process: building a command evaluates every annotation
    of its function, which a program (or a test suite) calling `main()` many times need not
    pay again. Commands themselves are built on first use (`LazyCommands`)."""
    global _GROUP
    if _GROUP is None:
        group = typer.main.get_command(app)
        assert isinstance(group, typer.core.TyperGroup)
        _GROUP = group
    return _GROUP


class StderrHandler(logging.Handler):
    """Log lines to the current `sys.stderr`, so that a progress bar that redirects it
    prints them above itself (a `StreamHandler` keeps the stream it started with)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(self.format(record) + "\n")
        except Exception:
            self.handleError(record)


def os_error_line(exc: OSError) -> str:
    """`PATH: No space left on device; free some space and run it again` from any OSError."""
    reason = exc.strerror or str(exc) or type(exc).__name__
    where = exc.filename if exc.filename is not None else None
    text = f"{where}: {reason}" if where is not None else reason
    hint = _OS_HINTS.get(exc.errno or -1)
    return f"{text}; {hint}" if hint else text


if __name__ == "__main__":
    sys.exit(main())
