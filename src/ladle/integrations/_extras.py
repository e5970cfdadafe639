"""Importing an optional extra (Lightning, transformers) with a one-line fix when it is missing.

Integrations are imported only when asked for (`import ladle` never pulls in a
training framework), so the only place a missing package can show up is here:
the error names the extra to install instead of a bare `ModuleNotFoundError`.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from ladle.errors import MissingDependency


def import_first(names: tuple[str, ...], *, extra: str, purpose: str) -> ModuleType:
    """The first importable module of `names`; MissingDependency naming `pip install ladle[extra]` if none is.

    Only a missing module counts as absent: an installed package that fails to
    import for another reason raises its own error, which says more.
    """
    for name in names:
        try:
            return importlib.import_module(name)
        except ModuleNotFoundError as exc:
            missing = exc.name or ""
            if missing and not any(n == missing or n.startswith(f"{missing}.") for n in names):
                raise  # the package is there but one of its own dependencies is missing
    tried = " or ".join(f"`{name}`" for name in names)
    raise MissingDependency(
        f"{purpose} needs {tried}, which is not installed; run: pip install 'ladle[{extra}]'"
    )
