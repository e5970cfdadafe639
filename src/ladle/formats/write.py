"""Writing tensors: safetensors (default) or torch format, atomically.

Every output is written to a temporary file beside its destination
(`.NAME.tmp-PID-RANDOM`), fsynced, and moved into place with `os.replace`, so
readers see the old file or the whole new one; a failed write leaves nothing
behind, and the temporary files of a killed writer (its pid no longer running)
are removed by the next write of the same destination. An existing destination
is only replaced with `force=True`.

An output may also be a URL (`s3://bucket/avg.safetensors`, `memory://...`; `file://`
is a local path): it is written to a local temporary file (in `TMPDIR`, deleted
afterwards, also on failure), then published in one upload, which object stores
make visible whole or not at all. `force` holds the same way: an existing object is
refused before any work, and without `force` the upload is a "create if absent"
(S3's conditional PUT; a check just before it on backends without one), so an object
another writer made meanwhile is not replaced. A folder (a prefix holding objects)
is refused; the bucket must exist, prefixes need not. A provenance sidecar goes up
before its output (see `ladle.averaging.front_doors`). Credentials and endpoints
come from fsspec's configuration and the backend's environment (`AWS_*` for S3).

`SafetensorsWriter` streams: the header is written from shapes and dtypes
known up front, then each tensor's bytes as it is produced, so an average of
any size is written while holding one tensor. A tensor stored under several
names (tied weights) is written once and its other names are recorded in the
`ladle.aliases` metadata entry, as the run store does for model.safetensors;
ladle's readers restore them (`safetensors.torch.load_model` also copes, as
the model ties them itself). The header may reserve room (trailing spaces, as
the format allows) for metadata known only at the end, such as the checksums of
what an average read: `finish(metadata=...)` rewrites it in place.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from enum import Enum

import torch

from ladle.errors import ConfigError, FormatError, OutputExists
from ladle.formats.safetensors_header import DTYPE_NAMES
from ladle.formats.source import ALIASES_KEY, TensorInfo, find_ties
from ladle.formats.tied_outputs import tied_copies
from ladle.store.fsspec_storage import FsspecStorage
from ladle.store.storage import is_url, local_path_of, storage_for

log = logging.getLogger("ladle")


class OutputFormat(str, Enum):
    """File format of an output."""

    SAFETENSORS = "safetensors"
    TORCH = "torch"


_TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".tar")


def output_format(path: str | os.PathLike[str], format: OutputFormat | str | None) -> OutputFormat:
    """The format to write `path` in: the one asked for, else what its suffix says."""
    text = os.fspath(path).lower()
    if format is None:
        if text.endswith(_TORCH_SUFFIXES):
            return OutputFormat.TORCH
        suffix = os.path.splitext(os.path.basename(text))[1]
        if suffix and suffix != ".safetensors":
            # out.onnx written as safetensors would mislead every tool that trusts the name.
            hint = " (for ONNX, run `ladle export CKPT -o model.onnx`)" if suffix == ".onnx" else ""
            raise ConfigError(
                f"{path}: the suffix {suffix} names no format ladle writes here; use .safetensors or "
                f".pt, or pass format explicitly (--format safetensors|torch){hint}"
            )
        return OutputFormat.SAFETENSORS
    try:
        chosen = OutputFormat(format)
    except ValueError:
        raise ConfigError(f"format={format!r} is not known; use 'safetensors' or 'torch'") from None
    if chosen is OutputFormat.TORCH and text.endswith(".safetensors"):
        raise ConfigError(f"{path}: a .safetensors name for torch format; rename it (e.g. .pt)")
    if chosen is OutputFormat.SAFETENSORS and text.endswith(_TORCH_SUFFIXES):
        raise ConfigError(f"{path}: a torch file name for safetensors format; use .safetensors")
    return chosen


def output_location(path: str | os.PathLike[str]) -> str:
    """An output's one spelling: the absolute local path (`file://` removed), or the URL as given."""
    text = os.fspath(path)
    return text if is_url(text) else os.path.abspath(local_path_of(text))


def output_exists(path: str | os.PathLike[str]) -> bool:
    """Whether something (a file, a link, a folder, an object) is at an output path or URL."""
    text = output_location(path)
    if is_url(text):
        storage, where = _store_of(text)
        return storage.kind(where) is not None
    return os.path.lexists(text)


def _store_of(url: str) -> tuple[FsspecStorage, str]:
    storage, where = storage_for(url)
    assert isinstance(storage, FsspecStorage)  # a URL is always served by fsspec
    return storage, where


def check_destination(path: str | os.PathLike[str], *, force: bool) -> str:
    """The output's location (see `output_location`) if it may be written: refuses folders,
    and existing files or objects unless `force`."""
    text = output_location(path)
    if is_url(text):
        storage, where = _store_of(text)
        kind = storage.kind(where)  # on an object store, also checks that the bucket exists
        if kind == "dir":
            raise OutputExists(
                f"{text}: is a folder (objects exist under it); give a file URL such as "
                f"{text.rstrip('/')}/model.safetensors"
            )
        if kind is not None and not force:
            raise OutputExists(f"{text}: already exists; pass force=True (--force) to replace it")
        return text
    if os.path.isdir(text):
        raise OutputExists(f"{text}: is a directory; give a file path such as {text}/model.safetensors")
    if os.path.lexists(text) and not force:
        raise OutputExists(f"{text}: already exists; pass force=True (--force) to replace it")
    parent = os.path.dirname(text)
    if not os.path.isdir(parent):
        raise ConfigError(f"{text}: the folder {parent} does not exist; create it first")
    return text


@contextmanager
def atomic_path(path: str | os.PathLike[str], *, force: bool = False) -> Iterator[str]:
    """A temporary path to write; on success it is fsynced and replaces `path` (uploaded to a URL)."""
    final = check_destination(path, force=force)
    if is_url(final):
        with _staged_upload(final, force=force) as tmp:
            yield tmp
        return
    folder, name = os.path.split(final)
    remove_stale_temporaries(final)
    tmp = os.path.join(folder, f".{name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        if os.path.lexists(final) and not force:
            raise OutputExists(f"{final}: appeared while writing; pass force=True to replace it")
        os.replace(tmp, final)
    except BaseException:
        if os.path.lexists(tmp):
            os.remove(tmp)
        raise
    dfd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


@contextmanager
def _staged_upload(url: str, *, force: bool) -> Iterator[str]:
    """A local temporary path (named like the output, so tools that go by the suffix agree) that
    is uploaded to `url` in one request on success; deleted afterwards in every case."""
    storage, where = _store_of(url)
    with _staging_folder() as staging:
        tmp = os.path.join(staging, url.rstrip("/").rsplit("/", 1)[-1] or "output")
        yield tmp
        storage.makedirs(where.rsplit("/", 1)[0])
        try:
            storage.upload(tmp, where, exclusive=not force)
        except FileExistsError:
            raise OutputExists(f"{url}: appeared while writing; pass force=True to replace it") from None


@contextmanager
def _staging_folder() -> Iterator[str]:
    """A fresh local folder for an output bound for a URL (`STAGING_PREFIX` + this pid), deleted
    afterwards in every case; the folders killed uploads left are removed first."""
    remove_stale_staging()
    staging = tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{os.getpid()}-")
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@contextmanager
def staged_folder_upload(url: str, *, force: bool, last: Sequence[str] = ()) -> Iterator[str]:
    """A local temporary folder whose files are uploaded under `url` on success (deleted in
    every case). A folder cannot be published in one request, so the files go one by one and
    those named in `last` (by suffix, in that order: the weights, then their index) go after
    the rest: until its last file arrives the folder is incomplete, never half-replaced with
    a newer weights file. Objects already under `url` are refused unless `force` (which
    replaces the files of the same names and leaves the others)."""
    storage, where = _store_of(url)
    kind = storage.kind(where)  # also checks that the bucket exists
    if kind == "file":
        raise OutputExists(f"{url}: is a file; the output is a folder, name a new one")
    if kind == "dir" and not force:
        raise OutputExists(f"{url}: objects exist under it; pass force=True (--force) to write over them")
    with _staging_folder() as staging:
        yield staging

        def rank(name: str) -> int:  # the latest entry of `last` that the name ends with
            return next((i + 1 for i in reversed(range(len(last))) if name.endswith(last[i])), 0)

        names = sorted(os.listdir(staging), key=lambda name: (rank(name), name))
        storage.makedirs(where)
        for name in names:
            storage.upload(os.path.join(staging, name), f"{where.rstrip('/')}/{name}")


STAGING_PREFIX = "ladle-output-"
"""Local folders of outputs bound for a URL: `ladle-output-PID-RANDOM` in the temporary folder."""


def remove_stale_staging(root: str | None = None) -> list[str]:
    """Remove the staging folders (`ladle-output-PID-*`) of uploads whose process was killed.

    A killed `avg`/`soup`/`export` to a URL cannot delete its local copy (up to the size of
    the output); the next upload on this machine does, leaving live writers' folders alone.
    """
    removed = []
    pattern = re.compile(rf"^{re.escape(STAGING_PREFIX)}(\d+)-")
    for stale in _left_by_dead_writers(root or tempfile.gettempdir(), pattern):
        if os.path.islink(stale) or not os.path.isdir(stale):
            continue
        shutil.rmtree(stale, ignore_errors=True)
        log.info("removed %s, left by an upload that was killed", stale)
        removed.append(stale)
    return removed


def _left_by_dead_writers(folder: str, pattern: re.Pattern[str]) -> Iterator[str]:
    """Paths in `folder` whose names match `pattern` (group 1: the writer's pid) and whose
    writer no longer runs on this machine."""
    try:
        entries = os.listdir(folder)
    except OSError:
        return
    for entry in entries:
        match = pattern.match(entry)
        if match is not None and not _pid_alive(int(match.group(1))):
            yield os.path.join(folder, entry)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_stale_temporaries(path: str | os.PathLike[str]) -> list[str]:
    """Remove the temporary files that writers of `path` left when they were killed.

    Only `.NAME.tmp-PID-RANDOM` files of this destination whose process no
    longer runs (on this machine) are removed; a live writer's file is left
    alone. Returns the paths removed.
    """
    final = os.path.abspath(os.fspath(path))
    folder, name = os.path.split(final)
    pattern = re.compile(rf"^\.{re.escape(name)}\.tmp-(\d+)-[0-9a-f]+$")
    removed = []
    for stale in _left_by_dead_writers(folder, pattern):
        try:
            os.remove(stale)
        except FileNotFoundError:
            continue  # another writer cleaned it first
        except OSError as exc:
            log.debug("could not remove %s: %s", stale, exc)
            continue
        log.info("removed %s, left by a writer that was killed", stale)
        removed.append(stale)
    return removed


_SYNC_EVERY = 32 << 20
"""Bytes written between background flushes of a SafetensorsWriter's file."""
_fdatasync = getattr(os, "fdatasync", os.fsync)  # macOS has no fdatasync


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done : done + (1 << 30)], offset + done)


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a CPU tensor, without a copy when it is contiguous."""
    flat = t.detach().reshape(-1)
    if not flat.is_contiguous():
        flat = flat.contiguous()
    if flat.device.type != "cpu":
        flat = flat.cpu()
    if flat.numel() == 0:
        return memoryview(b"")
    return memoryview(flat.view(torch.uint8).numpy())


class SafetensorsWriter:
    """Streams one safetensors file: header first, then each tensor in `order`.

    Layout: tensors sorted by decreasing element size (so every tensor is
    aligned to its own element size, as safetensors itself does). Tied names
    are listed under `ladle.aliases` (ladle's readers re-tie them) and, with
    `tied="copy"` (the default), also stored as full copies right after their
    target, so `safetensors.torch.load_file` + `load_state_dict(strict=True)`
    finds every name; `tied="alias"` stores each tied tensor once (smaller;
    load it with `ladle.load_weights`). See `ladle.formats.tied_outputs`.
    """

    def __init__(
        self,
        path: str,
        layout: Mapping[str, TensorInfo],
        *,
        metadata: Mapping[str, str] | None = None,
        ties: Mapping[str, str] | None = None,
        reserve: int = 0,
        tied: str = "copy",
    ) -> None:
        """`reserve`: bytes of header room kept for `finish(metadata=...)` to grow into."""
        self.path = path
        self._copies = tied_copies(ties, layout, tied)
        self.ties = {
            k: v for k, v in (ties or {}).items() if k in layout and v in layout and v not in (ties or {})
        }
        canon = [k for k in layout if k not in self.ties]
        position = {k: i for i, k in enumerate(layout)}
        canon.sort(key=lambda k: (-layout[k].dtype.itemsize, position[k]))
        self.order = canon
        header: dict[str, object] = {}
        meta = {str(k): str(v) for k, v in (metadata or {}).items()}
        # transformers refuses safetensors files without this entry.
        meta.setdefault("format", "pt")
        if self.ties:
            meta[ALIASES_KEY] = json.dumps(self.ties, sort_keys=True)
        if meta:
            header["__metadata__"] = meta
        offset = 0
        self._expected: dict[str, TensorInfo] = {}
        self._places: dict[str, list[int]] = {}  # data offsets of each key and of its copies
        for key in canon:
            info = layout[key]
            if info.dtype not in DTYPE_NAMES:
                raise FormatError(
                    f"{path}: tensor {key!r} has dtype {info.dtype}, which safetensors cannot store"
                )
            header[key] = {
                "dtype": DTYPE_NAMES[info.dtype],
                "shape": list(info.shape),
                "data_offsets": [offset, offset + info.nbytes],
            }
            self._places[key] = [offset]
            offset += info.nbytes
            self._expected[key] = info
            for alias in self._copies.get(key, ()):
                header[alias] = {**header[key], "data_offsets": [offset, offset + info.nbytes]}
                self._places[key].append(offset)
                offset += info.nbytes
        self._header = header
        self._metadata = meta
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (reserve + (-(len(raw) + reserve) % 8))
        self._header_len = len(raw)
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self._next = 0
        self._done = 0  # bytes of order[_next] written so far
        # Written bytes are flushed to disk in the background as the file grows, so the fsync
        # that commits the output finds little left to write (writing back overlaps the work).
        self._unsynced = 0
        self._syncer: ThreadPoolExecutor | None = None
        self._sync: Future[None] | None = None
        _pwrite_all(self._fd, memoryview(len(raw).to_bytes(8, "little") + raw), 0)

    def write(self, key: str, tensor: torch.Tensor) -> None:
        """Write `key` (and its aliases) whole; keys must come in `self.order`."""
        info = self._expected.get(key)
        if info is not None and (tuple(tensor.shape) != tuple(info.shape) or tensor.dtype != info.dtype):
            raise RuntimeError(
                f"SafetensorsWriter: {key!r} is {tuple(tensor.shape)} {tensor.dtype}, "
                f"the header says {tuple(info.shape)} {info.dtype}"
            )
        self.write_block(key, 0, tensor_bytes(tensor), whole=True)

    def write_block(self, key: str, start: int, data: memoryview, *, whole: bool = False) -> None:
        """Write bytes [start, start + len(data)) of `key` (and of its copies). Keys come in
        `self.order`, each key's blocks in order; the key is done at its last byte."""
        if self._next >= len(self.order) or self.order[self._next] != key:
            expected = self.order[self._next] if self._next < len(self.order) else "nothing"
            raise RuntimeError(f"SafetensorsWriter: got {key!r}, expected {expected!r}")
        nbytes = self._expected[key].nbytes
        if start != self._done or start + len(data) > nbytes or (whole and len(data) != nbytes):
            raise RuntimeError(
                f"SafetensorsWriter: {key!r} bytes {start}-{start + len(data)} do not follow "
                f"{self._done} of {nbytes}"
            )
        base = 8 + self._header_len + start
        for place in self._places[key]:
            _pwrite_all(self._fd, data, base + place)
        self._unsynced += len(data) * len(self._places[key])
        if self._unsynced >= _SYNC_EVERY and (self._sync is None or self._sync.done()):
            self._flush_in_background()
        self._done = start + len(data)
        if self._done == nbytes:
            self._next += 1
            self._done = 0

    def finish(self, metadata: Mapping[str, str] | None = None) -> None:
        """Check that every tensor was written, rewrite the metadata if given, then close.

        New metadata replaces the entries of the same names; the header must
        still fit in the room written at the start (see `reserve`).
        """
        if self._next != len(self.order):
            self.close()
            raise RuntimeError(f"SafetensorsWriter: {len(self.order) - self._next} tensors never written")
        if metadata:
            meta = {**self._metadata, **{str(k): str(v) for k, v in metadata.items()}}
            header = {**self._header, "__metadata__": meta}
            raw = json.dumps(header, separators=(",", ":")).encode()
            if len(raw) > self._header_len:
                self.close()
                raise RuntimeError(
                    f"SafetensorsWriter: the new metadata needs {len(raw) - self._header_len} bytes more "
                    "header room than was reserved"
                )
            raw += b" " * (self._header_len - len(raw))
            os.pwrite(self._fd, raw, 8)
        try:
            self._wait_for_flush()  # a write-back error surfaces here, not lost with the fd
        finally:
            self.close()

    def _flush_in_background(self) -> None:
        if self._sync is not None:
            self._sync.result()
        if self._syncer is None:
            self._syncer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ladle-flush")
        self._unsynced = 0
        self._sync = self._syncer.submit(_fdatasync, self._fd)

    def _wait_for_flush(self) -> None:
        sync, self._sync = self._sync, None
        if sync is not None:
            sync.result()

    def close(self) -> None:
        """Close the file (idempotent); an unfinished file is left for the caller to remove."""
        if self._syncer is not None:
            self._syncer.shutdown(wait=True)  # never close the fd under a running flush
            self._syncer = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def save_tensors(
    tensors: Mapping[str, torch.Tensor],
    path: str | os.PathLike[str],
    *,
    format: OutputFormat | str | None = None,
    metadata: Mapping[str, str] | None = None,
    force: bool = False,
) -> str:
    """Write a state dict to `path` (or a URL) atomically; returns the absolute path (or URL) written.

    safetensors by default (or by a `.safetensors` name), torch format for
    `.pt/.pth/.bin` names or `format="torch"`. Tied tensors are kept: shared
    in torch format, written per name and listed in `ladle.ties` in safetensors.
    `metadata` (text only) goes into the safetensors header; torch files hold
    the plain state dict.
    """
    chosen = output_format(path, format)
    bad = [k for k, v in tensors.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise FormatError(f"{path}: {bad[0]!r} is not a tensor; only tensors can be saved")
    with atomic_path(path, force=force) as tmp:
        if chosen is OutputFormat.TORCH:
            torch.save({k: v.detach().cpu() for k, v in tensors.items()}, tmp)
        else:
            write_safetensors(tmp, tensors, metadata=metadata)
    return output_location(path)


def write_safetensors(
    path: str,
    tensors: Mapping[str, torch.Tensor],
    *,
    metadata: Mapping[str, str] | None = None,
    ties: Mapping[str, str] | None = None,
) -> None:
    """Write an in-memory state dict as safetensors (not atomic: see `save_tensors`)."""
    layout = {k: TensorInfo(v.shape, v.dtype) for k, v in tensors.items()}
    found = find_ties(tensors) if ties is None else dict(ties)
    writer = SafetensorsWriter(path, layout, metadata=metadata, ties=found)
    try:
        for key in writer.order:
            writer.write(key, tensors[key])
        writer.finish()
    finally:
        writer.close()


def sidecar_path(output: str | os.PathLike[str]) -> str:
    """Where the provenance JSON of an output lives: `<output>.json`."""
    return f"{os.fspath(output)}.json"


def write_json(path: str | os.PathLike[str], data: object, *, force: bool = False) -> None:
    """Write a JSON file (or object at a URL) atomically."""
    with atomic_path(path, force=force) as tmp, open(tmp, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=1, sort_keys=False, default=str)
        handle.write("\n")
