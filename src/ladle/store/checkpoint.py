"""One committed checkpoint's record: `CheckpointInfo`, and its marker `meta.json`.

`meta.json` is written last by the commit protocol; a folder without a valid one is
not a checkpoint. It ends with a sha256 of its own bytes (`meta_sha256`, see
`seal_meta`), so a changed byte makes the checkpoint invalid for every reader alike.
Compatibility: a `meta.json` written before the checksum existed (no `meta_sha256`
field) is accepted as it is; every new one carries it. File names in `meta.json`
must be plain names inside the checkpoint folder.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ladle._version import __version__
from ladle.metrics import Mode, encode_metrics, is_finite_number, sort_key
from ladle.store.checksums import SHA256, XXH3_128, Checksum
from ladle.store.layout import META_NAME, is_plain_file_name
from ladle.store.paths import path_size

log = logging.getLogger("ladle")

CHECKPOINT_FORMAT = "ladle-checkpoint/1"
META_CHECKSUM = "meta_sha256"

# The checksum is the last member of meta.json, over the file's bytes without it.
_CHECKSUM_MEMBER = b',\n "' + META_CHECKSUM.encode() + b'": "'
_CHECKSUM_END = b'"\n}'
# The fields of a meta.json written before the seal existed (accepted unsealed).
_UNSEALED_FIELDS = frozenset(
    [
        "format",
        "name",
        "step",
        "epoch",
        "time",
        "metrics",
        "files",
        "pinned",
        "monitor",
        "kind",
        "seq",
        "extra",
        "ladle_version",
    ]
)


def seal_meta(body: bytes) -> bytes:
    """meta.json bytes: `body` (a JSON object written with indent=1) with its own sha256 appended.

    The checksum covers the exact bytes, so any change to a committed meta.json
    (a flipped bit, an edit) makes it invalid for every reader alike.
    """
    if not body.endswith(b"\n}"):
        raise ValueError("meta.json body must be a JSON object written with indent=1")
    digest = hashlib.sha256(body).hexdigest().encode()
    return body[:-2] + _CHECKSUM_MEMBER + digest + _CHECKSUM_END


def check_seal(raw: bytes) -> bool | None:
    """True when meta.json bytes match their own checksum, False when not, None when unsealed."""
    at = raw.rfind(_CHECKSUM_MEMBER)
    if at < 0:
        return None
    start = at + len(_CHECKSUM_MEMBER)
    digest, tail = raw[start : start + 64], raw[start + 64 :]
    if tail != _CHECKSUM_END:
        return False
    return hashlib.sha256(raw[:at] + b"\n}").hexdigest().encode() == digest


def load_meta(raw: bytes, path: str) -> CheckpointInfo:
    """The checkpoint that meta.json bytes describe; ValueError/KeyError/TypeError when invalid.

    Invalid: bytes that do not match their own checksum, not JSON, not a ladle
    marker, or a file name that is not a plain name inside the checkpoint.
    Compatibility: a meta.json without a checksum (written before ladle sealed its
    markers) is accepted when it holds only the fields those versions wrote; its
    content cannot be checked.
    """
    sealed = check_seal(raw)
    if sealed is False:
        raise ValueError("its bytes do not match its meta_sha256 (changed after commit)")
    meta = json.loads(raw)
    if not isinstance(meta, dict):
        raise TypeError("not a JSON object")
    if sealed is None and not set(meta) <= _UNSEALED_FIELDS:
        # A damaged seal (its key or layout changed) must not pass for an old, unsealed file.
        raise ValueError("its meta_sha256 seal is damaged (changed after commit)")
    return CheckpointInfo.from_meta(meta, path)


@dataclass(frozen=True)
class FileRecord:
    """Size and checksums of one file of a checkpoint, as recorded at commit.

    Empty checksums were not recorded: another tool's files (sizes only), or
    xxh3-128 in a checkpoint saved before ladle recorded it.
    """

    size: int
    sha256: str
    xxh3_128: str = ""

    def checksum(self) -> Checksum | None:
        """The recorded checksum a reader verifies the file against: the cheapest one
        recorded (see `ladle.store.checksums`), None when none was."""
        if self.xxh3_128:
            return Checksum(XXH3_128, self.xxh3_128)
        if self.sha256:
            return Checksum(SHA256, self.sha256)
        return None

    def to_meta(self) -> dict[str, Any]:
        """Its entry in meta.json's `files`."""
        entry: dict[str, Any] = {"size": self.size, "sha256": self.sha256}
        if self.xxh3_128:
            entry["xxh3_128"] = self.xxh3_128
        return entry

    @classmethod
    def from_meta(cls, entry: Mapping[str, Any]) -> FileRecord:
        """Parse an entry of meta.json's `files`; KeyError/TypeError/ValueError when malformed."""
        fast = entry.get("xxh3_128", "")
        if not isinstance(fast, str):
            raise TypeError(f"xxh3_128 is {type(fast).__name__}, not a hex string")
        return cls(size=int(entry["size"]), sha256=str(entry["sha256"]), xxh3_128=fast)


@dataclass(frozen=True)
class CheckpointInfo:
    """What the index knows about one committed checkpoint (read without loading tensors)."""

    name: str
    path: str
    step: int
    epoch: int | None
    time: float
    metrics: dict[str, float]
    files: dict[str, FileRecord]
    pinned: bool = False
    monitor: dict[str, str] | None = None
    kind: str = "train"
    seq: int = 0
    """Commit order within the run: the newest checkpoint has the largest seq."""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def size(self) -> int:
        """Total bytes of the checkpoint's recorded files."""
        return sum(f.size for f in self.files.values())

    def file(self, filename: str) -> str:
        """Path of one file of this checkpoint."""
        return f"{self.path.rstrip('/')}/{filename}"

    def has(self, filename: str) -> bool:
        return filename in self.files

    def to_meta(self) -> dict[str, Any]:
        """The meta.json mapping (without its checksum, which `meta_bytes()` adds)."""
        return {
            "format": CHECKPOINT_FORMAT,
            "name": self.name,
            "step": self.step,
            "epoch": self.epoch,
            "time": self.time,
            "metrics": self.metrics,
            "files": {k: v.to_meta() for k, v in self.files.items()},
            "pinned": self.pinned,
            "monitor": self.monitor,
            "kind": self.kind,
            "seq": self.seq,
            "extra": self.extra,
            "ladle_version": self.extra.get("ladle_version", __version__),
        }

    def meta_bytes(self) -> bytes:
        """The exact bytes of this checkpoint's meta.json, sealed with its own sha256."""
        return seal_meta(json.dumps(self.to_meta(), indent=1).encode())

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any], path: str) -> CheckpointInfo:
        """Parse a meta.json mapping; raises KeyError/TypeError/ValueError when malformed.

        The mapping's own checksum is checked on its bytes, by `load_meta()`.
        """
        if meta.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"unknown format {meta.get('format')!r}")
        files = {str(k): FileRecord.from_meta(dict(v)) for k, v in dict(meta["files"]).items()}
        for filename in files:
            if not is_plain_file_name(filename):
                raise ValueError(f"file name {filename!r} is not a plain name inside the checkpoint")
        return cls(
            name=str(meta["name"]),
            path=path,
            step=int(meta["step"]),
            epoch=None if meta.get("epoch") is None else int(meta["epoch"]),
            time=float(meta["time"]),
            metrics={str(k): v for k, v in dict(meta.get("metrics") or {}).items()},
            files=files,
            pinned=bool(meta.get("pinned", False)),
            monitor=dict(meta["monitor"]) if meta.get("monitor") else None,
            kind=str(meta.get("kind", "train")),
            seq=int(meta.get("seq", 0)),
            extra=dict(meta.get("extra") or {}),
        )


def best_of(checkpoints: Iterable[CheckpointInfo], metric: str, mode: Mode | str) -> CheckpointInfo | None:
    """The checkpoint with the best finite value of `metric`; the earliest wins a tie."""
    scored = [c for c in checkpoints if is_finite_number(c.metrics.get(metric))]
    if not scored:
        return None
    return min(scored, key=lambda c: (sort_key(c.metrics[metric], mode), c.seq))


def parse_meta(raw: bytes, path: str, name: str | None = None) -> CheckpointInfo | None:
    """The checkpoint a meta.json's bytes describe, or None (with a warning) when invalid.

    Invalid: not JSON, not a ladle marker, a content checksum that does not match,
    a file name that is not a plain name, or (given `name`) a different name.
    """
    meta_path = f"{path.rstrip('/')}/{META_NAME}"
    try:
        info = load_meta(raw, path)
    except (ValueError, KeyError, TypeError) as exc:
        log.warning("%s: invalid meta.json (%s); the checkpoint is not listed", meta_path, exc)
        return None
    if name is not None and info.name != name:
        log.warning("%s: meta.json names %r; the checkpoint is not listed", meta_path, info.name)
        return None
    return info


def new_record(
    name: str,
    path: str,
    files: dict[str, FileRecord],
    *,
    seq: int,
    step: int,
    epoch: int | None,
    metrics: Mapping[str, Any] | None,
    pinned: bool,
    monitor: Mapping[str, str] | None,
    kind: str,
    extra: Mapping[str, Any] | None,
) -> CheckpointInfo:
    """The record of a checkpoint committed now (by a commit or `Run.adopt`): metrics encoded."""
    return CheckpointInfo(
        name=name,
        path=path,
        step=int(step),
        epoch=None if epoch is None else int(epoch),
        time=time.time(),
        metrics=encode_metrics(metrics, where=f"{path}: metrics"),
        files=files,
        pinned=pinned,
        monitor=dict(monitor) if monitor else None,
        kind=kind,
        seq=seq,
        extra={"ladle_version": __version__, **dict(extra or {})},
    )


def size_records(paths: list[str]) -> dict[str, FileRecord]:
    """Records of another tool's checkpoint files (paths or URLs), which carry no checksums: sizes
    only, sha256 empty."""
    return {p.rstrip("/").rsplit("/", 1)[-1]: FileRecord(size=path_size(p), sha256="") for p in paths}
