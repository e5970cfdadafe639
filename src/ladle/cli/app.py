"""The Typer application every command module registers on, and shared CLI helpers.

Start-up is kept light: a command's module (and whatever heavy library it needs, torch
above all) is imported only when that command runs or shows its own help. `ladle --help`
lists the commands from `ladle.cli.commands.COMMANDS` without importing any of them.
"""

from __future__ import annotations

import importlib
import json
import sys
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
from typer.core import TyperArgument, TyperCommand, TyperGroup, TyperOption

from ladle.cli.commands import COMMANDS
from ladle.cli.plain_values import PlainCommand, PlainValues

if TYPE_CHECKING:
    from rich.console import Console

HELP = "Crash-safe PyTorch checkpoints: save, resume, keep, average and export."


class LazyCommands(PlainValues, TyperGroup):
    """A command group that imports each command's module only when the command is used."""

    def __init__(self, **attrs: Any) -> None:
        super().__init__(**attrs)
        # typer passes the commands registered so far (modules imported by an earlier run in
        # this process); they are built again by `load_command`, with tidy help.
        self.commands = {}

    def list_commands(self, ctx: Any) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        if cmd_name not in COMMANDS:
            return None
        if cmd_name not in self.commands:
            self.commands[cmd_name] = load_command(cmd_name)
        return self.commands[cmd_name]

    def format_commands(self, ctx: Any, formatter: Any) -> None:
        # The listing comes from the registry: building each command would import them all.
        rows = [(name, COMMANDS[name][1]) for name in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


def load_command(name: str) -> Any:
    """Import the module of command `name` and build its click command, with tidy help."""
    module, _ = COMMANDS[name]
    importlib.import_module(module)
    for info in app.registered_commands:
        if info.name == name:
            if info.cls in (None, TyperCommand):
                info.cls = PlainCommand  # parameters checked without pydantic
            command = typer.main.get_command_from_info(
                info, pretty_exceptions_short=True, rich_markup_mode=None
            )
            tidy_help(command)
            return command
    raise RuntimeError(f"{module} did not register the command {name!r}")  # pragma: no cover


def tidy_help(command: Any) -> None:
    """Readable --help: `--best-by METRIC` rather than `--best-by <str>`, `RUN` rather than `{RUN}`."""
    for param in command.params:
        if isinstance(param, TyperOption) and param.metavar is None and not param.is_flag:
            descriptor = getattr(param, "type_descriptor", None)
            choices = descriptor.choices if descriptor is not None and descriptor.is_choice else None
            if choices:
                param.metavar = "[" + "|".join(str(getattr(c, "value", c)) for c in choices) + "]"
            else:
                param.metavar = param.name.upper() if param.name else "VALUE"
        elif isinstance(param, TyperArgument):
            label = param.metavar or (param.name or "ARG").upper()
            usage = label if param.required else f"[{label}]"
            if param.nargs != 1 and not usage.endswith("..."):
                usage += "..."
            # Instance attributes: typer has no setting for these two renderings.
            param.display_type_rich = lambda ctx: None  # type: ignore[method-assign]
            param._usage_display_name = lambda usage=usage: usage  # type: ignore[method-assign]


app = typer.Typer(
    name="ladle",
    help=HELP,
    cls=LazyCommands,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # Plain click help: wraps at the terminal width, needs no rich, shows no type hints.
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)

_console: Console | None = None
_err_console: Console | None = None


def stdout_console() -> Console:
    """The rich console on stdout (created on first use: rich costs start-up time)."""
    global _console
    if _console is None:
        from rich.console import Console

        # Messages are not re-wrapped (the terminal wraps them, as it does for git or pip): a
        # path is never broken inside, so it can be copied whole. Tables still fit the width.
        _console = Console(soft_wrap=True)
    return _console


def stderr_console() -> Console:
    """The rich console on stderr (errors, progress bars)."""
    global _err_console
    if _err_console is None:
        from rich.console import Console

        _err_console = Console(stderr=True, soft_wrap=True)
    return _err_console


def say(text: str, *, err: bool = False, style: str | None = None) -> None:
    """Print one plain line (no markup, no highlighting, never wrapped or cut)."""
    if style is None:
        stream = sys.stderr if err else sys.stdout
        stream.write(text + "\n")
        return
    console = stderr_console() if err else stdout_console()
    console.print(text, style=style, markup=False, highlight=False, soft_wrap=True)


def fail(message: str, code: int = 2) -> NoReturn:
    """Print a one-line error (no traceback) and exit; 2 means bad input, 1 the environment."""
    say(f"ladle: error: {message}", err=True)
    raise typer.Exit(code)


def print_json(data: Any) -> None:
    """Machine-readable output for --json: one JSON document on stdout."""
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def _show_version(value: bool) -> None:
    if value:
        from ladle._version import __version__

        sys.stdout.write(f"ladle {__version__}\n")
        raise typer.Exit(0)


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version", is_eager=True, callback=_show_version, help="Print ladle's version and exit."
        ),
    ] = False,
) -> None:
    """Crash-safe PyTorch checkpoints: save, resume, keep, average and export."""


def __getattr__(name: str) -> Any:
    # `console` and `err_console` are created on first use (rich is not imported at start-up).
    if name == "console":
        return stdout_console()
    if name == "err_console":
        return stderr_console()
    raise AttributeError(name)
