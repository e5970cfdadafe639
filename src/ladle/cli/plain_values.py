"""Parameter values that need no conversion, kept away from pydantic (start-up time).

typer (0.29 and later) checks every parameter value with a pydantic `TypeAdapter`, and
importing pydantic costs about 0.1-0.2 s: more than the rest of `ladle ls`. Most of
ladle's parameters are strings, boolean flags and lists of strings, which click's parser
already hands over as they must be; for those, `use_plain_values` installs a check that
returns the value as it is and falls back to typer's own conversion for anything else
(so an odd value behaves exactly as before, only slower). The machinery is typer's own,
private (`typer._coercion`), so the shortcut is installed only for the typer versions it
was checked against (`CHECKED_TYPER`); any other version is left alone: `ladle` starts a
little slower there, but never depends on internals that may have changed.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import UnionType
from typing import Any, Union, get_args, get_origin

import typer
from typer.core import TyperCommand

CHECKED_TYPER = ((0, 29),)
"""(major, minor) versions of typer whose private coercion layer this module was checked against."""


def typer_checked(version: str) -> bool:
    """Whether typer `version` (e.g. "0.29.2") is one this module's shortcut was checked against."""
    parts = version.split(".")[:2]
    return (
        len(parts) == 2
        and all(p.isdigit() for p in parts)
        and (int(parts[0]), int(parts[1])) in CHECKED_TYPER
    )


RuntimeParam: Any = None
if typer_checked(getattr(typer, "__version__", "")):
    try:  # typer >= 0.29: the coercion layer this module shortcuts
        from typer._coercion import RuntimeParam, build_runtime_param
    except ImportError:  # pragma: no cover - older typer converts with click's own types
        RuntimeParam = None

if RuntimeParam is not None:

    @dataclass(frozen=True)
    class PlainValue(RuntimeParam):  # type: ignore[misc,valid-type]
        """A str, bool or list-of-str parameter: the parsed value is returned as it is."""

        kind: type

        def _coerce_value(self, value: Any, param: Any, ctx: Any) -> Any:
            if self.kind is list and isinstance(value, (list, tuple)):
                if all(isinstance(item, str) for item in value):
                    return list(value)
            elif isinstance(value, self.kind):
                return value
            # Anything unusual (bytes, a value from an environment variable): typer's way.
            return build_runtime_param(param.type_descriptor)._coerce_value(value, param, ctx)


def plain_kind(annotation: Any) -> type | None:
    """`str`, `bool` or `list` (of str) when `annotation` is one of those (or optional), else None."""
    if get_origin(annotation) in (Union, UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        if len(args) != 1:
            return None
        annotation = args[0]
    if annotation in (str, bool):
        return annotation
    if get_origin(annotation) is list and get_args(annotation) == (str,):
        return list
    return None


def use_plain_value(param: Any) -> None:
    """Give `param` (a parameter built by typer) the plain check, when its annotation is plain."""
    descriptor = getattr(param, "type_descriptor", None)
    if RuntimeParam is None or descriptor is None or not hasattr(param, "_runtime_param"):
        return
    info = descriptor.parameter_info
    kind = plain_kind(descriptor.annotation)
    if kind is None or info.parser is not None or descriptor.is_file or descriptor.is_path:
        return
    param._runtime_param = PlainValue(parameter_info=info, annotation=descriptor.annotation, kind=kind)


class PlainValues:
    """Mixin for typer's command classes: plain parameters, `--help` included, skip pydantic."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for param in self.params:  # type: ignore[attr-defined]
            use_plain_value(param)

    def get_help_option(self, ctx: Any) -> Any:
        # click makes the help option on first use, outside `params`.
        option = super().get_help_option(ctx)  # type: ignore[misc]
        if option is not None:
            use_plain_value(option)
        return option


class PlainCommand(PlainValues, TyperCommand):
    """The class of every ladle command (see `PlainValues`)."""
