"""The public API is one sorted `__all__` (httpx's rule): it equals the public names of the
package, every name exists, and no implementation module leaks out as an attribute."""

from __future__ import annotations

import subprocess
import sys
import types

import ladle


def test_all_is_unique_and_lists_no_private_names() -> None:
    # The order is ruff's isort-style sort (RUF022), checked by `make test`'s lint step.
    assert len(ladle.__all__) == len(set(ladle.__all__))
    assert all(not n.startswith("_") or n == "__version__" for n in ladle.__all__)


def test_all_equals_the_public_names() -> None:
    public = {n for n in dir(ladle) if not n.startswith("_")} | {"__version__"}
    assert set(ladle.__all__) == public


def test_every_exported_name_exists_and_none_is_a_module() -> None:
    for name in ladle.__all__:
        value = getattr(ladle, name)
        assert not isinstance(value, types.ModuleType), name


def test_public_classes_come_from_ladle_modules() -> None:
    for name in ladle.__all__:
        value = getattr(ladle, name)
        if isinstance(value, type):
            assert value.__module__.startswith("ladle."), name


def test_front_door_functions_do_not_shadow_modules() -> None:
    # `ladle.soup` and `ladle.average` are functions; no module of those names exists.
    import importlib.util

    assert callable(ladle.soup) and callable(ladle.average)
    assert importlib.util.find_spec("ladle.soup") is None
    assert importlib.util.find_spec("ladle.average") is None


def test_errors_users_can_meet_are_exported() -> None:
    for name in ("RunError", "RunNotFound", "NotARunDirectory", "ManagerClosed", "LadleError"):
        assert issubclass(getattr(ladle, name), ladle.LadleError)


def test_importing_ladle_does_not_import_torch() -> None:
    code = "import sys, ladle; ladle.ConfigError; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
