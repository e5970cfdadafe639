"""Where a soup goes: a file (with its provenance), a new checkpoint of its run, or memory.

`SoupOutput` gathers the choices that used to travel as separate keyword
arguments through every step of `ladle.soup` (file, format, replacing,
committing into the run, the new checkpoint's name); `save_state` and
`commit_soup` carry them out. A file soup holds its provenance in its
safetensors metadata, and `<output>.json` is written before the output is moved
into place, so a soup file never exists without its provenance.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ladle.averaging.front_doors import check_outputs
from ladle.averaging.provenance import provenance_metadata
from ladle.errors import ConfigError
from ladle.formats.write import (
    OutputFormat,
    atomic_path,
    output_format,
    output_location,
    sidecar_path,
    write_json,
    write_safetensors,
)
from ladle.store.checkpoint import CheckpointInfo
from ladle.store.foreign_runs import TRANSFORMERS, ForeignRun
from ladle.store.paths import local_copy
from ladle.store.run import Run
from ladle.store.storage import is_url

log = logging.getLogger("ladle")


@dataclass(kw_only=True)
class SoupOutput:
    """Where a soup is written, and how."""

    path: str | None = None
    """The file to write (safetensors unless a torch name or `format="torch"`); None: keep it in memory."""
    format: str | None = None
    """"safetensors" or "torch"; None decides by the file name."""
    force: bool = False
    """Replace an existing file."""
    into_run: bool = False
    """Also commit the soup into its run as a pinned checkpoint of kind "soup"."""
    name: str | None = None
    """The new checkpoint's name with `into_run` (default `soup-<recipe>-<step>`)."""

    def __post_init__(self) -> None:
        if self.path is not None:
            self.path = output_location(self.path)
            output_format(self.path, self.format)
        elif self.format is not None:
            output_format("soup", self.format)  # still a known format
        for flag in ("force", "into_run"):
            if not isinstance(getattr(self, flag), bool):
                raise ConfigError(f"{flag}={getattr(self, flag)!r} must be True or False")
        if self.name is not None and (not isinstance(self.name, str) or not self.name.strip()):
            raise ConfigError(f"name={self.name!r} must be a non-empty checkpoint name")

    def check(self) -> None:
        """Refuse an unwritable destination before any member is read."""
        if self.path is not None:
            check_outputs(self.path, force=self.force)


_TORCH_NAMES = (".pt", ".pth", ".bin", ".ckpt", ".tar")


def is_folder_output(run: object, output: str | os.PathLike[str] | None) -> bool:
    """Whether `output` names a `from_pretrained` folder: for a Trainer output directory, an
    existing folder or a name without a weights file suffix."""
    if output is None or not isinstance(run, ForeignRun) or run.tool != TRANSFORMERS:
        return False
    text = os.fspath(output)
    return os.path.isdir(text) or not text.lower().endswith((".safetensors", *_TORCH_NAMES))


def folder_weights_name(format: str | None) -> str:
    """transformers' file name for the soup's weights in a `from_pretrained` folder."""
    torch_format = format is not None and OutputFormat(format) is OutputFormat.TORCH
    return "pytorch_model.bin" if torch_format else "model.safetensors"


def save_state(state: Mapping[str, torch.Tensor], out: SoupOutput, record: Mapping[str, Any]) -> str:
    """Write a soup held in memory to `out.path` with its provenance; the path written."""
    assert out.path is not None
    final = check_outputs(out.path, force=out.force)
    chosen = output_format(final, out.format)
    with atomic_path(final, force=out.force) as tmp:
        if chosen is OutputFormat.TORCH:
            torch.save({k: v.detach().cpu() for k, v in state.items()}, tmp)
        else:
            write_safetensors(tmp, state, metadata=provenance_metadata(record))
        # Before the output is moved into place: it never exists without its provenance.
        write_json(sidecar_path(final), record, force=True)
    return final


def _slug(recipe: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+=-]+", "-", recipe).strip("-.")[:80] or "soup"


def newest_of(members: list[CheckpointInfo]) -> CheckpointInfo:
    """The newest checkpoint (highest step, then commit order)."""
    return max(members, key=lambda c: (c.step, c.seq))


def commit_soup(
    run: object,
    write: Callable[[str], None],
    *,
    recipe: str,
    members: list[CheckpointInfo],
    record: Mapping[str, Any],
    name: str | None,
    metrics: Mapping[str, float] | None = None,
) -> CheckpointInfo:
    """Commit a soup into its run as a pinned checkpoint; `write(path)` writes model.safetensors."""
    if not isinstance(run, Run):
        path = getattr(run, "path", run)
        raise ConfigError(f"{path}: not a ladle run; a soup can be committed only into a run")
    newest = newest_of(members)
    chosen_name = name or f"soup-{_slug(recipe)}-{newest.step:09d}"
    own_lock = not run.writable
    if own_lock:
        run.acquire()
    try:
        pending = run.begin(chosen_name)
        try:
            pending.write("model.safetensors", write)
        except BaseException:
            pending.abort()
            raise
        info = pending.commit(
            step=newest.step,
            epoch=newest.epoch,
            metrics=dict(metrics or {}),
            kind="soup",
            pinned=True,
            extra={"soup": dict(record), "models": ["model"], "ema": False},
        )
    finally:
        if own_lock:
            run.release()
    log.info("committed the soup into %s as %s", run.path, info.name)
    return info


def state_writer(state: Mapping[str, torch.Tensor], record: Mapping[str, Any]) -> Callable[[str], None]:
    """A writer of a soup held in memory, for `commit_soup`."""
    metadata = provenance_metadata(record)
    return lambda path: write_safetensors(path, state, metadata=metadata)


def file_writer(written: str, record: Mapping[str, Any]) -> Callable[[str], None]:
    """A writer that copies an already written soup file or URL (converted if it is torch format)."""
    if written.endswith(".safetensors"):

        def copy(dst: str) -> None:
            with local_copy(written) as local:
                shutil.copyfile(local, dst)

        return copy
    with local_copy(written) as local:
        state = torch.load(local, map_location="cpu", weights_only=True, mmap=not is_url(written))
    return state_writer(state, record)


__all__ = [
    "SoupOutput",
    "commit_soup",
    "file_writer",
    "folder_weights_name",
    "is_folder_output",
    "newest_of",
    "save_state",
    "state_writer",
]
