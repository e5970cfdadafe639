"""Name a checkpoint of a run the way people think of it: `RUN/best`, `RUN/latest`, `RUN/1200`.

The inspection tools take paths; these references are resolved to the checkpoint
folder they mean (by the run's index), so `ladle diff runs/exp1/best runs/exp1/latest`
works without looking up directory names first. Real paths always win.
"""

from __future__ import annotations

import os

from ladle.store.run import INDEX_NAME, META_NAME, Run

REFERENCES = ("best", "latest")


def is_run_dir(path: str) -> bool:
    """A local folder holding a ladle run (an index, or committed checkpoint folders)."""
    if not os.path.isdir(path) or os.path.isfile(os.path.join(path, META_NAME)):
        return False
    if os.path.isfile(os.path.join(path, INDEX_NAME)):
        return True
    return any(
        os.path.isfile(os.path.join(path, name, META_NAME))
        for name in os.listdir(path)
        if not name.startswith(".")
    )


def resolve_checkpoint(path: str | os.PathLike[str]) -> str:
    """`RUN/best`, `RUN/latest` or `RUN/<step>` as that checkpoint's folder; other paths as given."""
    text = os.fspath(path)
    if os.path.exists(text) or "://" in text:
        return text
    parent, name = os.path.split(os.path.abspath(text))
    if (name in REFERENCES or name.isdigit()) and is_run_dir(parent):
        ref: str | int = int(name) if name.isdigit() else name
        return Run(parent).get(ref).path
    return text
