"""Reading torch pickles (`.pt .pth .bin .ckpt .pth.tar`) safely and lazily.

Files load with `torch.load(weights_only=True, mmap=True)`: no code from the
file runs, and tensors stay in the file's mapping until read. A file that needs
full unpickling raises `UnsafeLoad` unless the caller passes `trust=True`. The
state dict may sit at the top level or under a common key (`state_dict` for
Lightning, `model`, `model_state_dict`, `module`, ...); `key=` picks any
other, nested with `.` or `/` (`"ema.model"`, `"ema/model"`).
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
import pickle
import sys
import zipfile
from collections.abc import Mapping
from typing import Any

import torch

from ladle.errors import FormatError, UnsafeLoad
from ladle.formats.source import TensorInfo, TensorSource, find_ties

log = logging.getLogger("ladle")

# Where state dicts usually live inside a checkpoint dict, in order of preference.
STATE_KEYS = ("state_dict", "model_state_dict", "model", "module", "net", "network")
# Keys that hold EMA weights: chosen by default only when nothing else is there.
EMA_KEYS = ("state_dict_ema", "model_ema", "ema_state_dict", "ema")
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pth.tar", ".tar")
_STEP_NAMES = ("global_step", "step", "num_updates", "iteration", "epoch")

_MADV_DONTNEED = 4


def _load(path: str, trust: bool) -> tuple[Any, bool]:
    """The unpickled object and whether its storages map the file."""
    use_mmap = zipfile.is_zipfile(path)
    if not use_mmap and not _legacy_pickle(path):
        raise FormatError(f"{path}: not a readable torch checkpoint (neither a zip archive nor a pickle)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=use_mmap), use_mmap
    except pickle.UnpicklingError as exc:
        if "Weights only load failed" not in str(exc):
            raise FormatError(f"{path}: not a torch checkpoint ({_first_line(exc)})") from None
        if not trust:
            raise UnsafeLoad(
                f"{path}: holds objects other than tensors ({_unsafe_globals(path)}); loading it "
                "runs code from the file: pass trust=True (--trust) only if you trust its source"
            ) from None
        log.warning("%s: fully unpickling (trusted)", path)
        return torch.load(path, map_location="cpu", weights_only=False, mmap=use_mmap), use_mmap
    except (RuntimeError, KeyError, EOFError, ValueError, zipfile.BadZipFile) as exc:
        raise FormatError(f"{path}: not a readable torch checkpoint ({_first_line(exc)})") from None
    except OSError as exc:
        raise FormatError(f"{path}: cannot read ({exc.strerror or exc})") from None


def _legacy_pickle(path: str) -> bool:
    """Old `torch.save` files are a bare pickle: they start with the PROTO opcode."""
    try:
        with open(path, "rb") as handle:
            return handle.read(1) == b"\x80"
    except OSError:
        return False


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:160]


def _unsafe_globals(path: str) -> str:
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # listing is a courtesy for the message; never fail on it
        return "unknown classes"
    shown = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
    return shown or "unknown classes"


def _is_tensor_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and any(isinstance(v, torch.Tensor) for v in obj.values())


def _has_tensors(obj: Any) -> bool:
    if isinstance(obj, torch.Tensor):
        return True
    if isinstance(obj, torch.nn.Module):
        return True
    if isinstance(obj, Mapping):
        return any(_has_tensors(v) for v in obj.values())
    return False


def resolve_key(obj: Any, key: str, path: str) -> Any:
    """Follow `key` into nested dicts; `.` and `/` separate levels, whole keys win."""
    if isinstance(obj, Mapping) and key in obj:
        return obj[key]
    if isinstance(obj, Mapping):
        for i, ch in enumerate(key):
            if ch in "./" and key[:i] in obj:
                try:
                    return resolve_key(obj[key[:i]], key[i + 1 :], path)
                except FormatError:
                    continue
    choices = ", ".join(repr(k) for k in candidate_keys(obj)) or "none"
    raise FormatError(f"{path}: no key {key!r} holding tensors; keys with tensors: {choices}")


def candidate_keys(obj: Any, prefix: str = "", depth: int = 0) -> list[str]:
    """Keys (nested with `.`) whose values are dicts of tensors: what `key=` may name."""
    if not isinstance(obj, Mapping) or depth > 3:
        return []
    out = []
    for k, v in obj.items():
        if isinstance(v, torch.nn.Module) or _is_tensor_dict(v):
            out.append(f"{prefix}{k}")
        elif isinstance(v, Mapping):
            out.extend(candidate_keys(v, f"{prefix}{k}.", depth + 1))
    return out


def _top_level(obj: Mapping[Any, Any]) -> tuple[list[str], list[str]]:
    """Keys of `obj` holding a tensor, and keys holding a dict of tensors (or a module).

    `*_extra_state` entries belong to a module's own state dict, so they never
    make a dict look like a training checkpoint.
    """
    tensors: list[str] = []
    nested: list[str] = []
    for k, v in obj.items():
        if isinstance(v, torch.Tensor):
            tensors.append(str(k))
        elif (
            isinstance(v, Mapping | torch.nn.Module)
            and not str(k).endswith("_extra_state")
            and _has_tensors(v)
        ):
            nested.append(str(k))
    return tensors, nested


def find_state_dict(obj: Any, key: str | None, path: str) -> tuple[Any, str | None]:
    """The state dict inside a loaded checkpoint and the key it was found under.

    A dict of tensors is the state dict itself. A dict that nests dicts of
    tensors is a training checkpoint: its well-known key (`state_dict`,
    `model_state_dict`, `model`, `module`, ...; EMA keys only when nothing else
    is there) is unwrapped, even when a stray tensor (an RNG state, a step
    counter) sits beside it. A dict that mixes tensors and dicts of tensors
    without such a key is refused with the keys to choose from, since taking
    all of it would count optimizer moments as weights.
    """
    if key is not None:
        if key in ("", ".", "/"):
            return obj, None
        return resolve_key(obj, key, path), key
    if isinstance(obj, torch.nn.Module):
        return obj, None
    if isinstance(obj, Mapping):
        tensors, nested = _top_level(obj)
        if tensors and not nested:
            return obj, None
        for name in STATE_KEYS:
            if name in nested:
                _note_ignored(path, name, tensors)
                return obj[name], name
        for name in EMA_KEYS:
            if name in nested:
                log.warning("%s: only EMA weights found; reading %r", path, name)
                _note_ignored(path, name, tensors)
                return obj[name], name
        choices = candidate_keys(obj)
        shown = ", ".join(repr(c) for c in choices[:8]) + (", ..." if len(choices) > 8 else "")
        if tensors and nested:
            top = ", ".join(repr(t) for t in tensors[:4]) + (", ..." if len(tensors) > 4 else "")
            raise FormatError(
                f"{path}: mixes top-level tensors ({top}) with dicts of tensors ({shown}), so it is not one "
                "state dict; choose where the weights are with key= (--key), or key='.' for the whole file"
            )
        if choices:
            raise FormatError(f"{path}: several dicts hold tensors ({shown}); choose one with key= (--key)")
    raise FormatError(
        f"{path}: holds no state dict (a {type(obj).__name__}); save model.state_dict() or "
        "name where it is with key= (--key)"
    )


def _note_ignored(path: str, chosen: str, tensors: list[str]) -> None:
    if tensors:
        log.info(
            "%s: reading the state dict under %r; ignoring %d top-level tensors (%s)",
            path,
            chosen,
            len(tensors),
            ", ".join(tensors[:4]),
        )


def flatten(obj: Any, path: str, prefix: str = "") -> tuple[dict[str, torch.Tensor], list[str]]:
    """Tensors of a (possibly nested) state dict with dotted keys, and skipped non-tensor keys."""
    if isinstance(obj, torch.nn.Module):
        obj = obj.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    skipped: list[str] = []
    if not isinstance(obj, Mapping):
        raise FormatError(
            f"{path}: {prefix.rstrip('.') or 'the file'} is a {type(obj).__name__}, not a dict of tensors"
        )
    for k, v in obj.items():
        name = f"{prefix}{k}"
        if isinstance(v, torch.Tensor):
            tensors[name] = v
        elif isinstance(v, Mapping | torch.nn.Module):
            sub, sub_skipped = flatten(v, path, f"{name}.")
            tensors.update(sub)
            skipped.extend(sub_skipped)
        else:
            skipped.append(name)
    return tensors, skipped


def _scalar_metadata(obj: Any) -> dict[str, Any]:
    if not isinstance(obj, Mapping):
        return {}
    return {
        str(k): v
        for k, v in obj.items()
        if isinstance(v, bool | int | float | str) and not isinstance(k, torch.Tensor)
    }


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
        self._fds: dict[str, int] = {}
        self._where: dict[str, tuple[int, int] | None] = {}
        self.skipped: list[str] = []
        self.found_under: str | None = None
        for file in files:
            obj, mapped = _load(file, trust)
            self._mapped = self._mapped and mapped
            if mapped:
                self._ranges.extend(_file_mappings(file))
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
                self.metadata = _scalar_metadata(obj)
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

    def _locate(self, key: str) -> tuple[int, int] | None:
        """(fd, file offset) of a contiguous tensor that lies in a file mapping, else None."""
        if key in self._where:
            return self._where[key]
        found = None
        t = self._tensors[key]
        if self._mapped and t.is_contiguous() and t.numel():
            ptr, nbytes = t.data_ptr(), t.numel() * t.element_size()
            for lo, hi, offset, path in self._ranges:
                if lo <= ptr and ptr + nbytes <= hi:
                    if path not in self._fds:
                        self._fds[path] = os.open(path, os.O_RDONLY)
                    found = (self._fds[path], ptr - lo + offset)
                    break
        self._where[key] = found
        return found

    def read_block(self, key: str, start: int, count: int, scratch: torch.Tensor | None) -> torch.Tensor:
        """A block of `key`: read from the file into `scratch` (like safetensors) when
        the tensor's place in the file is known, so its pages are never mapped in."""
        self._require(key)
        t = self._tensors[key]
        where = self._locate(key)
        if where is None:
            if not t.is_contiguous():
                # Rare (a saved view); one contiguous copy, kept until release(key).
                t = self._contiguous.setdefault(key, t.contiguous())
            return t.detach().reshape(-1)[start : start + count]
        fd, offset = where
        nbytes = count * t.element_size()
        if scratch is not None and scratch.numel() >= nbytes:
            buf = scratch[:nbytes]
        else:
            buf = torch.empty(nbytes, dtype=torch.uint8)
        view = memoryview(buf.numpy())
        done = 0
        while done < nbytes:
            n = os.preadv(fd, [view[done:]], offset + start * t.element_size() + done)
            if n <= 0:
                raise FormatError(f"{self.path}: tensor {key!r} ends early; the file is truncated")
            done += n
        return buf.view(t.dtype)

    def release_block(self, key: str, start: int, count: int) -> None:
        t = self._tensors.get(key)
        if t is None or not t.is_contiguous() or self._where.get(key) is not None:
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
        if not self._mapped or sys.platform != "linux" or nbytes < mmap.PAGESIZE:
            return
        page = mmap.PAGESIZE
        lo = (start + page - 1) // page * page
        hi = (start + nbytes) // page * page
        # Only ever inside this file's own mapping: a tensor made in memory while
        # unpickling (trust=True) must never be advised away.
        if hi > lo and any(a <= lo and hi <= b for a, b, _, _ in self._ranges):
            _madvise(lo, hi - lo)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}
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


def _madvise(address: int, length: int) -> None:
    libc = _libc()
    if libc is not None:
        libc.madvise(ctypes.c_void_p(address), ctypes.c_size_t(length), _MADV_DONTNEED)


_LIBC: Any = None


def _libc() -> Any:
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL(None, use_errno=True)
            _LIBC.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        except (OSError, AttributeError):
            _LIBC = False
    return _LIBC or None


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
