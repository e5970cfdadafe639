"""Writing tensors: safetensors (default) or torch format, atomically.

Every output is written to a temporary file beside its destination, fsynced,
and moved into place with `os.replace`, so readers see the old file or the
whole new one; a failed write leaves nothing behind. An existing destination is
only replaced with `force=True`.

`SafetensorsWriter` streams: the header is written from shapes and dtypes
known up front, then each tensor's bytes as it is produced, so an average of
any size is written while holding one tensor. A tensor stored under several
names (tied weights) is written once and its other names are recorded in the
`ladle.aliases` metadata entry, as the run store does for model.safetensors;
ladle's readers restore them (`safetensors.torch.load_model` also copes, as
the model ties them itself).
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from enum import Enum

import torch

from ladle.errors import ConfigError, FormatError, OutputExists
from ladle.formats.safetensors_io import DTYPE_NAMES
from ladle.formats.source import ALIASES_KEY, TensorInfo, find_ties


class OutputFormat(str, Enum):
    """File format of an output."""

    SAFETENSORS = "safetensors"
    TORCH = "torch"


_TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".tar")


def output_format(path: str | os.PathLike[str], format: OutputFormat | str | None) -> OutputFormat:
    """The format to write `path` in: the one asked for, else what its suffix says."""
    text = os.fspath(path).lower()
    if format is None:
        return OutputFormat.TORCH if text.endswith(_TORCH_SUFFIXES) else OutputFormat.SAFETENSORS
    try:
        chosen = OutputFormat(format)
    except ValueError:
        raise ConfigError(f"format={format!r} is not known; use 'safetensors' or 'torch'") from None
    if chosen is OutputFormat.TORCH and text.endswith(".safetensors"):
        raise ConfigError(f"{path}: a .safetensors name for torch format; rename it (e.g. .pt)")
    if chosen is OutputFormat.SAFETENSORS and text.endswith(_TORCH_SUFFIXES):
        raise ConfigError(f"{path}: a torch file name for safetensors format; use .safetensors")
    return chosen


def check_destination(path: str | os.PathLike[str], *, force: bool) -> str:
    """Absolute `path` if it may be written: refuses directories, and files unless `force`."""
    text = os.path.abspath(os.fspath(path))
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
    """A temporary path to write; on success it is fsynced and replaces `path`."""
    final = check_destination(path, force=force)
    folder, name = os.path.split(final)
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


def _write_all(fd: int, data: memoryview) -> None:
    done = 0
    while done < len(data):
        done += os.write(fd, data[done : done + (1 << 30)])


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
    aligned to its own element size, as safetensors itself does); tied names
    are not stored but listed under `ladle.aliases`.
    """

    def __init__(
        self,
        path: str,
        layout: Mapping[str, TensorInfo],
        *,
        metadata: Mapping[str, str] | None = None,
        ties: Mapping[str, str] | None = None,
    ) -> None:
        self.path = path
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
            offset += info.nbytes
            self._expected[key] = info
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self._next = 0
        _write_all(self._fd, memoryview(len(raw).to_bytes(8, "little") + raw))

    def write(self, key: str, tensor: torch.Tensor) -> None:
        """Write `key` (and its aliases); keys must come in `self.order`."""
        if self._next >= len(self.order) or self.order[self._next] != key:
            expected = self.order[self._next] if self._next < len(self.order) else "nothing"
            raise RuntimeError(f"SafetensorsWriter: got {key!r}, expected {expected!r}")
        info = self._expected[key]
        if tuple(tensor.shape) != tuple(info.shape) or tensor.dtype != info.dtype:
            raise RuntimeError(
                f"SafetensorsWriter: {key!r} is {tuple(tensor.shape)} {tensor.dtype}, "
                f"the header says {tuple(info.shape)} {info.dtype}"
            )
        _write_all(self._fd, tensor_bytes(tensor))
        self._next += 1

    def finish(self) -> None:
        """Check that every tensor was written, then close."""
        if self._next != len(self.order):
            self.close()
            raise RuntimeError(f"SafetensorsWriter: {len(self.order) - self._next} tensors never written")
        self.close()

    def close(self) -> None:
        """Close the file (idempotent); an unfinished file is left for the caller to remove."""
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
    """Write a state dict to `path` atomically; returns the absolute path written.

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
    return os.path.abspath(os.fspath(path))


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
    """Write a JSON file atomically."""
    with atomic_path(path, force=force) as tmp, open(tmp, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=1, sort_keys=False, default=str)
        handle.write("\n")
