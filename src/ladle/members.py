"""Turning what a user names (files, globs, folders, runs) into the members of an average.

Rules:
- a glob expands to its matches, in natural order (`ckpt_9` before `ckpt_10`);
- a ladle run folder expands to its committed training checkpoints, oldest first;
  `RUN@REF` names one of them (a name, a step, "latest" or "best");
- a checkpoint or model folder (ladle `meta.json`, transformers files) is one member;
- any other folder expands to the checkpoint files directly inside it;
- the same file named twice, or two hard links to one file (best/last copies),
  counts once, with a notice; different files with identical contents are
  both kept, with a notice.
"""

from __future__ import annotations

import glob
import logging
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from ladle.errors import CheckpointNotFound, ConfigError
from ladle.formats import DictSource, TensorSource, load_source
from ladle.formats.load import HF_WEIGHT_FILES
from ladle.formats.torch_io import is_torch_file
from ladle.storage import LocalStorage
from ladle.store import INDEX_NAME, META_NAME, CheckpointInfo, Run, sha256_file

log = logging.getLogger("ladle")

_GLOB_CHARS = re.compile(r"[*?\[]")


@dataclass(kw_only=True, eq=False)
class Member:
    """One checkpoint taking part in an average, opened for lazy reading."""

    source: TensorSource
    """Where its tensors come from."""
    label: str
    """How messages name it (a path, or a run checkpoint's path)."""
    step: int | None = None
    """Training step, when known (ladle meta.json, Lightning, transformers Trainer)."""
    epoch: int | None = None
    """Epoch, when known."""
    metrics: dict[str, Any] = field(default_factory=dict)
    """Recorded metrics (ladle checkpoints), used by softmax weights."""
    name: str | None = None
    """The checkpoint's name inside its run, for ladle checkpoints."""
    sha256: str | None = None
    """Checksum of its weight file: recorded by the run store, or computed on request."""
    file_hashes: dict[str, str] = field(default_factory=dict)
    """Checksums of every backing file of a multi-file member (sharded folders)."""
    owned: bool = True
    """Whether ladle opened the source (and closes it); sources passed in stay open."""

    def record(self, weight: float) -> dict[str, Any]:
        """Its provenance entry."""
        entry: dict[str, Any] = {
            "path": self.source.path,
            "name": self.name,
            "step": self.step,
            "epoch": self.epoch,
            "sha256": self.sha256,
            "weight": weight,
            "format": self.source.format,
        }
        if self.file_hashes:
            entry["files"] = dict(self.file_hashes)
        if self.metrics:
            entry["metrics"] = dict(self.metrics)
        return entry

    def close(self) -> None:
        if self.owned:
            self.source.close()


def natural_key(text: str) -> list[Any]:
    """Sort key that orders digits by value: ckpt_9 < ckpt_10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def is_run_dir(path: str) -> bool:
    """A ladle run: has an index, or holds checkpoint folders but is not one itself."""
    if not os.path.isdir(path) or os.path.isfile(os.path.join(path, META_NAME)):
        return False
    if os.path.isfile(os.path.join(path, INDEX_NAME)):
        return True
    try:
        names = os.listdir(path)
    except OSError:
        return False
    return any(os.path.isfile(os.path.join(path, n, META_NAME)) for n in names)


def _is_weight_file(name: str) -> bool:
    return name.endswith(".safetensors") or is_torch_file(name)


def expand(inputs: Iterable[str | os.PathLike[str]]) -> list[str]:
    """Paths (globs, folders, runs, `RUN@REF`) as a flat list of loadable paths."""
    out: list[str] = []
    for item in inputs:
        text = os.fspath(item)
        if os.path.exists(text):
            out.extend(_expand_existing(text))
            continue
        run_path, at, ref = text.rpartition("@")
        if at and run_path and is_run_dir(run_path):
            run = Run(run_path)
            out.append(run.get(int(ref) if ref.isdigit() else ref).path)
            continue
        if _GLOB_CHARS.search(text):
            matches = sorted(glob.glob(text, recursive=True), key=natural_key)
            if not matches:
                raise CheckpointNotFound(f"{text}: the pattern matches nothing")
            for match in matches:
                out.extend(_expand_existing(match))
            continue
        raise CheckpointNotFound(f"{text}: no such file, folder or run checkpoint")
    return out


def _expand_existing(path: str) -> list[str]:
    if not os.path.isdir(path):
        return [path]
    if os.path.isfile(os.path.join(path, META_NAME)):
        return [path]
    if any(os.path.isfile(os.path.join(path, f)) for f in HF_WEIGHT_FILES):
        return [path]
    if is_run_dir(path):
        checkpoints = [c for c in Run(path).checkpoints() if c.kind == "train"]
        if not checkpoints:
            raise CheckpointNotFound(f"{path}: the run has no committed training checkpoints")
        return [c.path for c in checkpoints]
    files = sorted(
        (os.path.join(path, n) for n in os.listdir(path) if _is_weight_file(n)),
        key=natural_key,
    )
    files = [f for f in files if os.path.isfile(f)]
    if not files:
        raise CheckpointNotFound(
            f"{path}: no checkpoint files (.safetensors, .pt, .pth, .bin, .ckpt) in this folder"
        )
    return files


InputLike = str | os.PathLike[str] | TensorSource | Mapping[str, torch.Tensor] | Member | CheckpointInfo


def member_from_source(source: TensorSource, *, label: str | None = None) -> Member:
    """A member around an open source, with step, epoch and metrics from its metadata."""
    meta = source.metadata
    epoch = meta.get("epoch")
    metrics = meta.get("metrics")
    return Member(
        source=source,
        label=label or source.path,
        step=source.step,
        epoch=int(epoch) if isinstance(epoch, int | float) and not isinstance(epoch, bool) else None,
        metrics=dict(metrics) if isinstance(metrics, dict) else {},
        name=meta.get("name") if source.format == "ladle" else None,
        sha256=source.sha256,
    )


def open_members(
    inputs: Sequence[InputLike],
    *,
    key: str | None = None,
    strip_prefix: str | Sequence[str] | None = (),
    trust: bool = False,
    dedupe: bool = True,
    hash_files: bool = False,
) -> list[Member]:
    """Open every input as a member; close them with `close_members` (or use `Members`).

    `hash_files=True` computes the sha256 of backing files whose checksum is not
    recorded already (ladle checkpoints record theirs), for provenance.
    """
    members: list[Member] = []
    try:
        for item in inputs:
            if isinstance(item, Member):
                members.append(item)
            elif isinstance(item, TensorSource):
                member = member_from_source(item)
                member.owned = False
                members.append(member)
            elif isinstance(item, CheckpointInfo):
                source = load_source(item.path, key=key, strip_prefix=strip_prefix, trust=trust)
                members.append(member_from_source(source))
            elif isinstance(item, Mapping):
                label = f"<state dict {len(members) + 1}>"
                members.append(member_from_source(DictSource(item, path=label)))
            elif isinstance(item, str | os.PathLike):
                for path in expand([item]):
                    source = load_source(path, key=key, strip_prefix=strip_prefix, trust=trust)
                    members.append(member_from_source(source))
            else:
                raise ConfigError(
                    f"cannot average a {type(item).__name__}; pass paths, state dicts or TensorSources"
                )
        if dedupe:
            members = _dedupe(members)
        if hash_files:
            # hashlib releases the GIL: files hash side by side.
            with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
                list(pool.map(_hash, members))
        _note_identical(members)
    except BaseException:
        close_members(members)
        raise
    if not members:
        raise ConfigError("nothing to average: no inputs given")
    return members


def close_members(members: Iterable[Member]) -> None:
    for member in members:
        member.close()


def _identity(member: Member) -> tuple[tuple[int, int], ...] | None:
    files = member.source.files
    if not files:
        return None
    ids = []
    for path in files:
        try:
            st = os.stat(path)
        except OSError:
            return None
        ids.append((st.st_dev, st.st_ino))
    return tuple(ids)


def _dedupe(members: list[Member]) -> list[Member]:
    seen: dict[tuple[Any, ...], Member] = {}
    kept: list[Member] = []
    for member in members:
        ident = _identity(member)
        if ident is not None:
            ident = (*ident, member.source.format, tuple(member.source.keys()))
        if ident is not None and ident in seen:
            first = seen[ident]
            same = os.path.realpath(first.source.path) == os.path.realpath(member.source.path)
            how = "is given twice" if same else f"is the same file as {first.label} (a hard link)"
            log.warning("%s %s; counting it once", member.label, how)
            member.close()
            continue
        if ident is not None:
            seen[ident] = member
        kept.append(member)
    return kept


def _hash(member: Member) -> None:
    files = member.source.files
    if member.sha256 is not None or not files:
        return
    storage = LocalStorage()
    if len(files) == 1:
        member.sha256 = sha256_file(storage, files[0])
    else:
        member.file_hashes = {os.path.basename(f): sha256_file(storage, f) for f in files}


def _note_identical(members: list[Member]) -> None:
    seen: dict[str, Member] = {}
    for member in members:
        if member.sha256 is None:
            continue
        if member.sha256 in seen:
            log.warning(
                "%s has the same contents as %s (sha256 %s…); both are counted",
                member.label,
                seen[member.sha256].label,
                member.sha256[:12],
            )
        else:
            seen[member.sha256] = member
