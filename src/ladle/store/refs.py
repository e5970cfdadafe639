"""The one way to name a checkpoint of a run, parsed here and nowhere else.

A reference is `RUN/SELECTOR` or `RUN@SELECTOR`, where `RUN` is a run directory
(a local path or an fsspec URL) and `SELECTOR` is one of

- `latest`: the newest training checkpoint (by commit order; soups never count),
- `best`: the best checkpoint by the run's monitored metric,
- a step number (`1200`): the newest checkpoint saved at that step,
- a checkpoint name (`step-000001200`, `soup-top3`).

A real path always wins: `runs/exp1/best` means the folder if one is named so
(ladle refuses such names, so only foreign folders can). `RUN/<name>` is simply
the checkpoint's folder. `RUN@SELECTOR` is the form that cannot be mistaken for
a path (shells complete it less, but globs never expand it). Every command that
takes a checkpoint, `Run.get` and `CheckpointManager.resume` accept the same forms.
"""

from __future__ import annotations

import os

from ladle.errors import CheckpointNotFound, NotARunDirectory
from ladle.store.checkpoint import CheckpointInfo
from ladle.store.layout import HISTORY_NAME, INDEX_NAME, META_NAME, RESERVED_NAMES
from ladle.store.lock import LOCK_NAME
from ladle.store.run import Run
from ladle.store.storage import storage_for

ROLES = RESERVED_NAMES  # ("latest", "best"): no checkpoint may be named so


def parse_selector(text: str | int) -> str | int:
    """`"latest"`/`"best"` as they are, a step as an int, anything else as a checkpoint name."""
    if isinstance(text, bool):
        raise CheckpointNotFound(f"{text!r} names no checkpoint; use 'latest', 'best', a step or a name")
    if isinstance(text, int):
        return text
    selector = str(text).strip()
    if selector.isdigit():
        return int(selector)
    return selector


def split_reference(text: str | os.PathLike[str]) -> tuple[str, str | int] | None:
    """(run, selector) for `RUN@SEL`, or for `RUN/latest`, `RUN/best`, `RUN/<step>`; else None.

    Purely by form; whether `RUN` is a run is for the caller to check.
    """
    raw = os.fspath(text)
    if "@" in raw.split("://", 1)[-1]:
        run, _, selector = raw.rpartition("@")
        if run and selector and "/" not in selector:
            return run.rstrip("/") or run, parse_selector(selector)
    stripped = raw.rstrip("/")
    run, sep, last = stripped.rpartition("/")
    if sep and run and (last in ROLES or last.isdigit()):
        return run, parse_selector(last)
    return None


def is_run_dir(path: str | os.PathLike[str]) -> bool:
    """A folder holding a ladle run (an index, or committed checkpoint folders), local or URL."""
    try:
        storage, text = storage_for(path)
        if not storage.isdir(text) or storage.isfile(storage.join(text, META_NAME)):
            return False
        if storage.isfile(storage.join(text, INDEX_NAME)):
            return True
        return any(
            storage.isfile(storage.join(text, name, META_NAME))
            for name in storage.listdir(text)
            if not name.startswith(".")
        )
    except OSError:
        return False


def has_run_files(path: str | os.PathLike[str]) -> bool:
    """Whether `path` holds a ladle run: an index, committed checkpoints, or the lock or history
    that a writer which has not committed yet leaves (a run with no checkpoints yet)."""
    if is_run_dir(path):
        return True
    try:
        storage, where = storage_for(path)
        return any(storage.exists(storage.join(where, name)) for name in (LOCK_NAME, HISTORY_NAME))
    except OSError:
        return False


def not_a_run_message(path: str) -> str:
    """Why `path` (an existing folder, local or on a store) is not a ladle run, and what to run
    instead."""
    from ladle.store.foreign_runs import foreign_tool

    tool = foreign_tool(path)
    if tool is not None:
        return (
            f"{path}: a {tool} output folder, not a ladle run; average it with `ladle soup {path}` "
            f"or look at one checkpoint with `ladle inspect`"
        )
    return (
        f"{path}: not a ladle run (no ladle.json and no checkpoint folder with a meta.json); "
        "pass the folder a CheckpointManager writes to"
    )


def open_run_to_read(path: str | os.PathLike[str]) -> Run:
    """The run at `path`, to read. An existing folder that holds no run (another tool's folder,
    a folder of loose files) is refused with one line saying what it is: opened as a run, it
    would read as a run with no checkpoints."""
    storage, where = storage_for(path)
    if storage.isdir(where) and not has_run_files(where):
        raise NotARunDirectory(not_a_run_message(where))
    return Run(path)


def find_checkpoint(text: str | os.PathLike[str]) -> CheckpointInfo | None:
    """The checkpoint a reference names, or None when `text` is not a reference to a run.

    Raises `CheckpointNotFound` (listing what exists) when the run is there but the
    selector matches none of its checkpoints.
    """
    raw = os.fspath(text)
    storage, path = storage_for(raw)
    if storage.exists(path):
        if storage.isfile(storage.join(path, META_NAME)):
            parent, _, name = path.rstrip("/").rpartition("/")
            return Run(parent).get(name)
        return None
    split = split_reference(raw)
    if split is None or not is_run_dir(split[0]):
        return None
    return Run(split[0]).get(split[1])


def resolve_checkpoint(path: str | os.PathLike[str]) -> str:
    """A reference (`RUN/best`, `RUN@1200`, ...) as that checkpoint's folder; other paths as given."""
    text = os.fspath(path)
    storage, normal = storage_for(text)
    if storage.exists(normal):
        return text
    found = find_checkpoint(text)
    return found.path if found is not None else text
