"""Choosing the checkpoint of a run to resume from, for the integration callbacks.

Frameworks resume from their own files (`lightning.ckpt`, a Trainer checkpoint
folder); ladle's part is to pick one that was committed and whose files still
match their recorded checksums.
"""

from __future__ import annotations

import logging
import os

from ladle.errors import CheckpointNotFound, CorruptCheckpoint
from ladle.store.checkpoint import CheckpointInfo, best_of
from ladle.store.paths import path_isdir
from ladle.store.run import Run

log = logging.getLogger("ladle")


def find_resumable(
    run_dir: str | os.PathLike[str], which: str | int = "latest", *, needs: str, verify: bool = True
) -> CheckpointInfo | None:
    """The training checkpoint to resume from: one that holds the file `needs`; None when there is none.

    `which`: "latest", "best" (the run's monitored metric), a name or a step.
    With `verify`, sizes and checksums are checked first: a damaged latest
    checkpoint is skipped for the newest good one (with a warning); a damaged
    checkpoint asked for by name is an error.
    """
    text = os.fspath(run_dir)
    if not path_isdir(text):  # a local path or a URL (s3://...)
        if which == "latest":
            return None
        raise CheckpointNotFound(f"{text}: no such run directory; check the path")
    run = Run(text)
    usable = [c for c in run.checkpoints(kind="train") if c.has(needs)]
    if which == "latest":
        ordered = sorted(usable, key=lambda c: -c.seq)
        if not ordered:
            return None
    elif which == "best":
        monitor = run.monitor
        best = best_of(usable, monitor["metric"], monitor["mode"]) if monitor else None
        if best is None:
            raise CheckpointNotFound(
                f"{run.path}: no best checkpoint (the run records no monitored metric with a finite "
                "value); resume 'latest'"
            )
        ordered = [best]
    else:
        info = run.get(which)
        if not info.has(needs):
            raise CheckpointNotFound(f"{info.path}: holds no {needs}, so training cannot resume from it")
        ordered = [info]
    for info in ordered:
        problems = run.verify(info, load=False) if verify else []
        if not problems:
            return info
        if which != "latest":
            raise CorruptCheckpoint(f"{problems[0]}; resume from another checkpoint")
        log.warning("%s; trying the checkpoint before it", problems[0])
    raise CorruptCheckpoint(f"{run.path}: every checkpoint fails verification; see `ladle verify {run.path}`")
