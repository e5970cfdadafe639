"""Imports every command module so that each registers itself on the app (one line each)."""

from ladle.cli import avg  # noqa: F401
from ladle.cli import demo  # noqa: F401
from ladle.cli import diff  # noqa: F401
from ladle.cli import export  # noqa: F401
from ladle.cli import inspect  # noqa: F401
from ladle.cli import ls  # noqa: F401
from ladle.cli import report  # noqa: F401
from ladle.cli import soup  # noqa: F401
from ladle.cli import verify  # noqa: F401
from ladle.cli import version  # noqa: F401
