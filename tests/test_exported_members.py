"""The public API is one sorted `__all__`, and every name in it exists."""

from __future__ import annotations

import ladle


def test_all_is_unique_and_lists_no_private_names() -> None:
    # The order is ruff's isort-style sort (RUF022), checked by `make test`'s lint step.
    assert len(ladle.__all__) == len(set(ladle.__all__))
    assert all(not n.startswith("_") or n == "__version__" for n in ladle.__all__)


def test_every_exported_name_exists() -> None:
    for name in ladle.__all__:
        assert hasattr(ladle, name), name


def test_public_classes_come_from_ladle_modules() -> None:
    for name in ladle.__all__:
        value = getattr(ladle, name)
        if isinstance(value, type):
            assert value.__module__.startswith("ladle."), name
