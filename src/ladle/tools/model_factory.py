"""The user's code named on the command line: `module:function` specs (`--model`, `--eval`).

Exporting to TorchScript or ONNX, and greedy soups, need code a checkpoint of
weights does not hold. The user names a callable: `mypkg.models:build_model`,
`models.py:Net`, or a dotted attribute `mypkg.zoo:Registry.small`. Importing it
runs the user's own code, which naming it on the command line is the explicit
opt-in to. The current directory is importable (as with `python -m`) while the
module is imported and while a factory runs, since that is where such code
usually lives, and is taken off `sys.path` again afterwards. This is the one
loader: `ladle export --model`, `ladle soup --model` and `ladle soup --eval`
all resolve their specs here. Every failure is a one-line `ModelFactoryError`
naming the flag and the spec.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import sys
from collections.abc import Callable, Iterator
from typing import cast

from torch import nn

from ladle.errors import ModelFactoryError, first_line

ModelSpec = str | Callable[[], nn.Module]


def resolve_factory(spec: str) -> Callable[[], nn.Module]:
    """The callable a `module:factory` spec names (imports the module)."""
    return cast("Callable[[], nn.Module]", resolve_callable(spec, flag="--model"))


def resolve_callable(spec: str, *, flag: str) -> Callable[..., object]:
    """The callable a `module:function` spec names (imports the module); `flag` names the
    command-line option in errors ("--model", "--eval")."""
    module_name, sep, attr_path = spec.rpartition(":")
    if not sep or not module_name or not attr_path:
        example = (
            "mypkg.models:build_model or models.py:Net (a zero-argument callable returning the nn.Module)"
            if flag == "--model"
            else "mypkg.evaluation:evaluate or eval.py:evaluate"
        )
        form = "MODULE:FACTORY" if flag == "--model" else "MODULE:FUNCTION"
        raise ModelFactoryError(f"{flag} {spec!r}: expected {form}, e.g. {example}")
    module = _import(spec, module_name, flag)
    target: object = module
    walked = []
    for part in attr_path.split("."):
        walked.append(part)
        if not hasattr(target, part):
            where = f"{module_name}:{'.'.join(walked[:-1])}" if walked[:-1] else module_name
            names = sorted(n for n in dir(target) if not n.startswith("_"))
            shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
            raise ModelFactoryError(
                f"{flag} {spec!r}: {where} has no attribute {part!r}; it has: {shown or 'nothing'}"
            )
        target = getattr(target, part)
    if not callable(target):
        raise ModelFactoryError(
            f"{flag} {spec!r}: {attr_path} is a {type(target).__name__}, not a callable; "
            "name a function or class"
        )
    return target


def factory_for(spec: str) -> Callable[[], nn.Module]:
    """A zero-argument model builder for `spec`, resolved now (so a bad spec fails before any
    work); each call builds and checks the model as `build_model` does."""
    factory = resolve_factory(spec)
    return lambda: build_model(factory, name=spec)


def build_model(spec: ModelSpec, *, name: str | None = None) -> nn.Module:
    """Call the factory (a spec string or a callable) and check it returned an nn.Module."""
    factory = resolve_factory(spec) if isinstance(spec, str) else spec
    if name is None:
        name = spec if isinstance(spec, str) else getattr(spec, "__qualname__", repr(spec))
    try:
        with _cwd_importable():
            model = factory()
    except Exception as exc:
        raise ModelFactoryError(
            f"--model {name!r}: the factory raised {type(exc).__name__}: {first_line(exc)}; "
            "fix it so that calling it with no arguments builds the model"
        ) from exc
    if not isinstance(model, nn.Module):
        raise ModelFactoryError(
            f"--model {name!r}: the factory returned a {type(model).__name__}, not a torch.nn.Module"
        )
    return model


def _import(spec: str, module_name: str, flag: str) -> object:
    if module_name.endswith(".py") or os.sep in module_name:
        return _import_file(spec, module_name, flag)
    try:
        with _cwd_importable():
            return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            raise ModelFactoryError(
                f"{flag} {spec!r}: no module named {exc.name!r}; run ladle from the folder "
                "that holds it, install your package, or give a file: path/to/file.py:function"
            ) from None
        raise ModelFactoryError(
            f"{flag} {spec!r}: importing {module_name!r} failed: {first_line(exc)}"
        ) from exc
    except Exception as exc:
        raise ModelFactoryError(
            f"{flag} {spec!r}: importing {module_name!r} failed: {type(exc).__name__}: {first_line(exc)}"
        ) from exc


def _import_file(spec: str, filename: str, flag: str) -> object:
    path = os.path.abspath(filename)
    if not os.path.isfile(path):
        raise ModelFactoryError(f"{flag} {spec!r}: no such file {path}")
    name = f"ladle_user_{abs(hash(path))}"
    if name in sys.modules:  # one file named by --model and --eval is imported once
        return sys.modules[name]
    loader_spec = importlib.util.spec_from_file_location(name, path)
    if loader_spec is None or loader_spec.loader is None:
        raise ModelFactoryError(f"{flag} {spec!r}: {path} cannot be imported as Python code")
    module = importlib.util.module_from_spec(loader_spec)
    sys.modules[name] = module
    try:
        with _cwd_importable(os.path.dirname(path)):
            loader_spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[name]
        raise ModelFactoryError(
            f"{flag} {spec!r}: importing {path} failed: {type(exc).__name__}: {first_line(exc)}"
        ) from exc
    return module


@contextlib.contextmanager
def _cwd_importable(folder: str | None = None) -> Iterator[None]:
    """Put `folder` (default: the working directory) first on sys.path for the import."""
    entry = os.path.abspath(folder or os.getcwd())
    added = entry not in sys.path
    if added:
        sys.path.insert(0, entry)
    try:
        yield
    finally:
        if added and entry in sys.path:
            sys.path.remove(entry)
