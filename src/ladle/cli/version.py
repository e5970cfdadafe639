"""`ladle version`: print the installed version (and, with --json, the libraries it runs on)."""

from __future__ import annotations

from typing import Annotated

import typer

from ladle._version import __version__
from ladle.cli.app import app, print_json, say

# Read from installed metadata, so that printing them imports none of them (importlib.metadata
# itself costs start-up time: it is imported for --json only).
LIBRARIES = ("torch", "safetensors", "numpy", "fsspec")


@app.command("version")
def version_command(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """Print ladle's version."""
    if not as_json:
        say(__version__)
        return
    import platform
    from importlib import metadata

    versions: dict[str, str | None] = {}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    print_json({"ladle": __version__, "python": platform.python_version(), **versions})
