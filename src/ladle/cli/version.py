"""`ladle version`: print the installed version."""

from ladle._version import __version__
from ladle.cli.app import app, console


@app.command()
def version() -> None:
    """Print ladle's version."""
    console.print(__version__)
