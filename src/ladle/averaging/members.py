"""Turning what a user names (files, globs, folders, runs) into the members of an average.

What a name expands to is `ladle.averaging.member_paths`'s job; here the paths are
opened as members, and duplicates are counted once:
- the same file named twice, or two hard links to one file (best/last copies),
  counts once, with a notice;
- files of one expanded folder that hold the same weights at the same step
  (Lightning's `last.ckpt`, saved again beside the newest `epoch=...ckpt`) count
  once, with a notice; different files with identical contents named one by
  one are both kept, with a notice. `dedupe=False` keeps every duplicate.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ladle.averaging.member_paths import expand_one
from ladle.errors import ConfigError
from ladle.formats import DictSource, TensorSource, load_source
from ladle.store.checkpoint import CheckpointInfo
from ladle.store.checksums import SHA256, Checksum
from ladle.store.storage import is_url

log = logging.getLogger("ladle")


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
    read_checksums: dict[str, Checksum] = field(default_factory=dict)
    """Checksums of its backing files' bytes as the average read them, by path (empty until hashed)."""
    owned: bool = True
    """Whether ladle opened the source (and closes it); sources passed in stay open."""

    @property
    def hashed(self) -> bool:
        """Whether its checksums were taken from the bytes read."""
        return bool(self.read_checksums)

    @property
    def content(self) -> Checksum | None:
        """The checksum of the bytes read of a one-file member (what tells identical files apart)."""
        if len(self.source.files) == 1:
            return self.read_checksums.get(self.source.files[0])
        return None

    def file_checksums(self, path: str) -> dict[str, str]:
        """What provenance records of one backing file: {algorithm: hex} of the bytes read, and
        the sha256 its run recorded once the bytes read matched the checksum recorded beside it
        (the same bytes: what other tools identify the file by)."""
        read = self.read_checksums.get(path)
        if read is None:
            return {}
        out = {read.algorithm: read.hex}
        record = self.source.recorded.get(path)
        if record is not None and record.sha256 and record.checksum() == read:
            out.setdefault(SHA256, record.sha256)
        return out

    def record(self, weight: float) -> dict[str, Any]:
        """Its provenance entry."""
        entry: dict[str, Any] = {
            "path": self.source.path,
            "name": self.name,
            "step": self.step,
            "epoch": self.epoch,
            SHA256: None,
            "weight": weight,
            "format": self.source.format,
        }
        files = self.source.files
        if len(files) == 1:
            entry.update(self.file_checksums(files[0]))
        elif self.hashed:
            read = [f for f in files if f in self.read_checksums]
            entry["files"] = {os.path.basename(f): self.file_checksums(f) for f in read}
        recorded = {os.path.basename(f): r.sha256 for f, r in self.source.recorded.items() if r.sha256}
        if not self.hashed and recorded:
            # Not read-verified (hashing off): what the run recorded, named as such.
            entry["recorded_sha256"] = next(iter(recorded.values())) if len(files) == 1 else recorded
        if self.metrics:
            entry["metrics"] = dict(self.metrics)
        return entry

    def close(self) -> None:
        if self.owned:
            self.source.close()


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
    )


def open_members(
    inputs: Sequence[InputLike],
    *,
    key: str | None = None,
    strip_prefix: str | Sequence[str] | None = (),
    trust: bool = False,
    dedupe: bool = True,
) -> list[Member]:
    """Open every input as a member; close them with `close_members`.

    Checksums are taken later, while the average reads the members
    (`ladle.averaging.integrity`).
    """
    members: list[Member] = []
    listed_from: dict[int, str] = {}  # id(member) -> the folder its file was listed from
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
                for path, folder in expand_one(os.fspath(item)):
                    source = load_source(path, key=key, strip_prefix=strip_prefix, trust=trust)
                    members.append(member_from_source(source))
                    if folder is not None:
                        listed_from[id(members[-1])] = folder
            else:
                raise ConfigError(
                    f"cannot average a {type(item).__name__}; pass paths, state dicts or TensorSources"
                )
        if dedupe:
            members = _dedupe(members)
            members = _drop_same_weights(members, listed_from)
    except BaseException:
        close_members(members)
        raise
    if not members:
        raise ConfigError("nothing to average: no inputs given")
    return members


def close_members(members: Iterable[Member]) -> None:
    for member in members:
        member.close()


def _identity(member: Member) -> tuple[tuple[Any, ...], ...] | None:
    files = member.source.files
    if not files:
        return None
    ids: list[tuple[Any, ...]] = []
    for path in files:
        if is_url(path):
            ids.append((path,))  # an object on a store is its URL (no links there)
            continue
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


_LAST_CKPT = re.compile(r"^last(-v\d+)?\.ckpt$")
"""Lightning's `ModelCheckpoint(save_last=True)` names: a second save of the newest checkpoint."""
_BLOCK = 1 << 20


def _drop_same_weights(members: list[Member], listed_from: Mapping[int, str]) -> list[Member]:
    """Members listed from one folder that hold the same weights at the same step count once.

    A cheap fingerprint (step, keys, shapes, dtypes, the first bytes of two
    tensors) finds the candidates; only those are compared in full, block by
    block. Of two equal ones the first listed stays, except that Lightning's
    `last.ckpt` is the one left out.
    """
    groups: dict[tuple[Any, ...], list[Member]] = {}
    for member in members:
        folder = listed_from.get(id(member))
        if folder is not None:
            groups.setdefault((folder, *_fingerprint(member)), []).append(member)
    dropped: set[int] = set()
    for group in groups.values():
        if len(group) < 2:
            continue
        kept: list[Member] = []
        # Stable: Lightning's last*.ckpt goes last, so its twin is the one kept.
        for member in sorted(group, key=lambda m: bool(_LAST_CKPT.match(os.path.basename(m.label)))):
            twin = next((k for k in kept if _same_weights(k.source, member.source)), None)
            if twin is None:
                kept.append(member)
                continue
            log.warning(
                "%s holds the same weights as %s (step %s); counting it once (--keep-duplicates counts both)",
                member.label,
                twin.label,
                member.step if member.step is not None else "unknown",
            )
            dropped.add(id(member))
    if not dropped:
        return members
    for member in members:
        if id(member) in dropped:
            member.close()
    return [m for m in members if id(m) not in dropped]


def _fingerprint(member: Member) -> tuple[Any, ...]:
    source = member.source
    keys = tuple(source.keys())
    infos = tuple((tuple(i.shape), i.dtype) for i in (source.info(k) for k in keys))
    samples = []
    filled = [k for k, (shape, _) in zip(keys, infos, strict=True) if math.prod(shape) > 0]
    for key in dict.fromkeys(filled[:1] + filled[-1:]):
        count = min(math.prod(source.info(key).shape), 512)
        samples.append(bytes(_as_bytes(source.read_block(key, 0, count, None)).numpy()))
    return (member.step, keys, infos, tuple(samples))


def _as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    flat = tensor.reshape(-1).contiguous()
    return flat.view(torch.uint8) if flat.dtype != torch.uint8 else flat


def _same_weights(a: TensorSource, b: TensorSource) -> bool:
    """Whether two sources (same keys, shapes, dtypes) hold bit-identical tensors and ties."""
    if a.ties() != b.ties():
        return False
    ties = a.ties()
    scratch_a = torch.empty(_BLOCK, dtype=torch.uint8)
    scratch_b = torch.empty(_BLOCK, dtype=torch.uint8)
    for key in a:
        if key in ties:
            continue
        info = a.info(key)
        total = info.numel
        per = max(1, _BLOCK // max(info.itemsize, 1))
        try:
            for start in range(0, total, per):
                count = min(per, total - start)
                x = _as_bytes(a.read_block(key, start, count, scratch_a))
                y = _as_bytes(b.read_block(key, start, count, scratch_b))
                if not torch.equal(x, y):
                    return False
        finally:
            a.release(key)
            b.release(key)
    return True


def note_identical(members: Sequence[Member]) -> None:
    """Log members whose bytes read hash the same (different files, identical contents)."""
    seen: dict[Checksum, Member] = {}
    for member in members:
        content = member.content
        if content is None:
            continue
        if content in seen:
            log.warning(
                "%s has the same contents as %s (%s); both are counted",
                member.label,
                seen[content].label,
                content,
            )
        else:
            seen[content] = member
