"""Torch pickles (`.pt .pth .bin .ckpt .pth.tar`, and sharded `.bin` sets) read lazily.

`TorchSource` loads each file without running code (`ladle.formats.torch_load`), finds
its state dict (`ladle.formats.state_dicts`), and leaves the tensors in the file's
mapping until read; pages already averaged are handed back to the kernel
(`ladle.formats.mapped_pages`), so a pass over a large file does not stay resident.
"""

from __future__ import annotations

import logging
import os
import sys

import torch

from ladle.errors import FormatError
from ladle.formats.mapped_pages import drop_pages, inner_pages
from ladle.formats.source import TensorInfo, TensorSource, find_ties
from ladle.formats.state_dicts import find_state_dict, flatten, scalar_metadata
from ladle.formats.torch_load import load_torch_file

log = logging.getLogger("ladle")

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pth.tar", ".tar")
_STEP_NAMES = ("global_step", "step", "num_updates", "iteration", "epoch")


class TorchSource(TensorSource):
    """A torch pickle (or several shards of one, like `pytorch_model-0000x-of-0000y.bin`)."""

    format = "torch"

    def __init__(
        self,
        path: str,
        *,
        key: str | None = None,
        trust: bool = False,
        shards: list[str] | None = None,
    ) -> None:
        super().__init__()
        self.path = path
        files = shards or [path]
        self.files = list(files)
        self._tensors: dict[str, torch.Tensor] = {}
        self._mapped = True
        self._ranges: list[tuple[int, int, int, str]] = []
        self._contiguous: dict[str, torch.Tensor] = {}
        self._where: dict[str, tuple[str, int] | None] = {}
        self.skipped: list[str] = []
        self.found_under: str | None = None
        for file in files:
            obj, mapped = load_torch_file(file, trust=trust)
            self._mapped = self._mapped and mapped
            if mapped:
                # Named as given (as in `files`), so a caller hashing `files` finds each span's file.
                self._ranges.extend((lo, hi, offset, file) for lo, hi, offset, _ in _file_mappings(file))
            state, self.found_under = find_state_dict(obj, key, file)
            tensors, skipped = flatten(state, file)
            if not tensors:
                raise FormatError(f"{file}: {key or 'the state dict'} holds no tensors")
            for name in tensors:
                if name in self._tensors:
                    raise FormatError(f"{file}: tensor {name!r} also appears in an earlier shard")
            self._tensors.update(tensors)
            self.skipped.extend(skipped)
            if file == files[0]:
                self.metadata = scalar_metadata(obj)
        if shards:
            self.format = "torch-sharded"
        if self.skipped:
            log.info("%s: ignoring %d non-tensor entries (%s)", path, len(self.skipped), self.skipped[0])
        self._ties = find_ties(self._tensors)

    @property
    def step(self) -> int | None:
        for name in _STEP_NAMES[:-1]:
            value = self.metadata.get(name)
            if isinstance(value, int) and not isinstance(value, bool):
                return value
        return None

    def keys(self) -> list[str]:
        return list(self._tensors)

    def info(self, key: str) -> TensorInfo:
        self._require(key)
        t = self._tensors[key]
        return TensorInfo(t.shape, t.dtype)

    def tensor(self, key: str) -> torch.Tensor:
        self._require(key)
        return self._tensors[key].detach()

    def ties(self) -> dict[str, str]:
        return dict(self._ties)

    def _locate(self, key: str) -> tuple[str, int] | None:
        """(file, offset) of a contiguous tensor that lies in a file mapping, else None."""
        if key in self._where:
            return self._where[key]
        found = None
        t = self._tensors[key]
        if self._mapped and t.is_contiguous() and t.numel():
            ptr, nbytes = t.data_ptr(), t.numel() * t.element_size()
            for lo, hi, offset, path in self._ranges:
                if lo <= ptr and ptr + nbytes <= hi:
                    found = (path, ptr - lo + offset)
                    break
        self._where[key] = found
        return found

    def read_block(self, key: str, start: int, count: int, scratch: torch.Tensor | None) -> torch.Tensor:
        """A block of `key`, flat. A tensor in torch's mapping of the file is answered with a
        view of the mapping: no copy, which on a warm page cache is most of what reading
        costs (copying 1.3 GB takes about as long as summing and hashing it together).
        `release_block` then drops the block's pages from this process again."""
        self._require(key)
        t = self._tensors[key]
        if not t.is_contiguous():
            # Rare (a saved view); one contiguous copy, kept until release(key).
            t = self._contiguous.setdefault(key, t.contiguous())
        return t.detach().reshape(-1)[start : start + count]

    def span(self, key: str) -> tuple[str, int] | None:
        self._require(key)
        return self._locate(key)

    def release_block(self, key: str, start: int, count: int) -> None:
        t = self._tensors.get(key)
        if t is None or not t.is_contiguous():
            return
        size = t.element_size()
        self._drop(t.data_ptr() + start * size, count * size)

    def release(self, key: str) -> None:
        """Drop the file pages behind `key` from this process (they stay in the page cache).

        Only for storages that map the file privately and were never written:
        the kernel then re-reads the same bytes from the file if they are touched
        again, so nothing can change; without this, every page of every source
        read so far would count in the process's memory.
        """
        self._contiguous.pop(key, None)
        t = self._tensors.get(key)
        if t is None:
            return
        self._drop(t.data_ptr(), t.numel() * t.element_size())

    def _drop(self, start: int, nbytes: int) -> None:
        if not self._mapped:
            return
        lo, hi = inner_pages(start, nbytes)
        # Only ever inside this file's own mapping: a tensor made in memory while
        # unpickling (trust=True) must never be advised away.
        if hi > lo and any(a <= lo and hi <= b for a, b, _, _ in self._ranges):
            drop_pages(lo, hi)

    def close(self) -> None:
        self._tensors = {}
        self._contiguous = {}
        self.closed = True


def _file_mappings(path: str) -> list[tuple[int, int, int, str]]:
    """(start, end, file offset, path) of each place this process maps `path` (/proc/self/maps)."""
    if sys.platform != "linux":
        return []
    real = os.path.realpath(path)
    ranges = []
    try:
        with open("/proc/self/maps") as handle:
            for line in handle:
                parts = line.split(maxsplit=5)
                if len(parts) == 6 and parts[5].rstrip("\n") == real:
                    lo, hi = parts[0].split("-")
                    ranges.append((int(lo, 16), int(hi, 16), int(parts[2], 16), real))
    except OSError:
        return []
    return ranges


def is_torch_file(path: str) -> bool:
    return path.lower().endswith(TORCH_SUFFIXES)


def torch_shards(index_path: str) -> list[str]:
    """Shard files of a `pytorch_model.bin.index.json`, in first-use order."""
    from ladle.formats.safetensors_io import read_index

    weight_map, _ = read_index(index_path)
    folder = os.path.dirname(index_path)
    shards = [os.path.join(folder, s) for s in dict.fromkeys(weight_map.values())]
    for shard in shards:
        if not os.path.isfile(shard):
            raise FormatError(f"{index_path}: shard {os.path.basename(shard)} is missing")
    return shards
