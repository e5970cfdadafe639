"""The names inside a run directory: checkpoint folders, the run's own files, leftovers.

One place says which names mean what, so the run, the commit protocol, the
references (`RUN/latest`, `RUN/<step>`) and `ladle ls` agree on them.
"""

from __future__ import annotations

import re

from ladle.errors import ConfigError
from ladle.store.lock import LOCK_NAME

INDEX_NAME = "ladle.json"
META_NAME = "meta.json"
HISTORY_NAME = "history.jsonl"
TMP_PREFIX = ".tmp-"
TRASH_PREFIX = ".trash-"
# Names that `RUN/<name>` resolves to something else: a folder so named could never be reached.
RESERVED_NAMES = ("latest", "best")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+=-]{0,199}$")


def checkpoint_name(step: int) -> str:
    """The default directory name of the checkpoint saved at `step` (a step count, >= 0)."""
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ConfigError(f"step={step!r} is not allowed; use an integer >= 0 (the steps completed)")
    return f"step-{step:09d}"


def validate_name(name: str) -> str:
    """A checkpoint name must be a plain directory name that cannot collide with run files.

    `latest`, `best` and names made only of digits are refused: `RUN/latest`,
    `RUN/best` and `RUN/<step>` refer to checkpoints by role and step.
    """
    if (
        not isinstance(name, str)
        or not NAME_RE.match(name)
        or name in (INDEX_NAME, LOCK_NAME, META_NAME, HISTORY_NAME)
    ):
        raise ConfigError(
            f"checkpoint name {name!r} is not allowed; use letters, digits and ._+=- "
            "and do not start with a dot"
        )
    if name in RESERVED_NAMES or name.isdigit():
        raise ConfigError(
            f"checkpoint name {name!r} is not allowed: RUN/{name} already means the "
            f"{'checkpoint at that step' if name.isdigit() else name + ' checkpoint'}; choose another name"
        )
    return name


def is_plain_file_name(name: str) -> bool:
    """A file name a checkpoint may record: one path component inside its folder.

    Dot files are refused, except DCP's fixed `.metadata` (a sharded checkpoint's index).
    """
    return name == ".metadata" or (
        bool(name)
        and name not in (".", "..")
        and not name.startswith(".")
        and not any(c in name for c in "/\\\0")
    )


def is_leftover(name: str) -> bool:
    """Entries interrupted writes leave in a run: temporary folders, trash, `ladle.json.tmp-PID`."""
    return name.startswith((TMP_PREFIX, TRASH_PREFIX, f"{INDEX_NAME}.tmp-", f"{HISTORY_NAME}.tmp-"))
