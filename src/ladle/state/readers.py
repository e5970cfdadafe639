"""Reading a committed ladle checkpoint back: model weights, the training-state payload, EMA weights.

The counterpart of what the save engine writes for `CheckpointManager`:
`<name>.safetensors` per registered `nn.Module` (tied tensors restored from the
file's alias metadata), `state.pt` (every other object's state, loaded with
`weights_only=True`, so reading never runs code from the checkpoint) and
`ema.safetensors` (in a sharded checkpoint, the `ema` entry of its DCP folder).
Every failure to read is a `CorruptCheckpoint` naming the
file, so `resume(fallback=True)` can move on to an older checkpoint; weights
that do not fit a live model are a `StateMismatch`. Nothing here changes a live
object: the manager loads what these functions return only once everything is
read and checked.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ladle.errors import CorruptCheckpoint, StateMismatch, first_line
from ladle.formats.dcp_metadata import METADATA_NAME as DCP_METADATA
from ladle.formats.mapped_pages import map_file
from ladle.formats.safetensors_io import tensors_from_buffer
from ladle.state.model_weights import ALIASES_KEY, STATE_FORMAT, check_model_fits, with_aliases
from ladle.store.checkpoint import CheckpointInfo
from ladle.store.checks import check_readable
from ladle.store.checksums import checksum_mapped
from ladle.store.paths import local_copy
from ladle.store.storage import Storage

log = logging.getLogger("ladle")

STATE_FILE = "state.pt"
"""The training-state payload of a manager checkpoint."""
EMA_NAME = "ema"
"""The registered name of a `ladle.EMA`; its weights go to `ema.safetensors` (in a sharded
checkpoint: to the DCP entry `ema`, beside the models)."""
_FALLBACK_HINT = "resume(fallback=True) uses the previous good checkpoint"


def read_model_weights(
    storage: Storage,
    info: CheckpointInfo,
    models: Mapping[str, nn.Module],
    *,
    strict: bool,
) -> dict[str, dict[str, torch.Tensor]]:
    """Each model's weights from `<name>.safetensors`; with `strict`, checked to fit the live model first.

    Local files: the tensors are views of a private mapping of the file, so the only
    copy is the live model's; when `read_checkpoint` verifies, its hashing threads
    read the same pages: no second read.
    """
    from safetensors import safe_open

    found: dict[str, dict[str, torch.Tensor]] = {}
    for name, model in models.items():
        filename = f"{name}.safetensors"
        if filename not in info.files:
            raise StateMismatch(
                f"{info.path}: holds no weights for model {name!r} (files: "
                f"{', '.join(sorted(info.files))}); register the same names as the saving run"
            )
        try:
            local = storage.local_path(info.file(filename))
            if local is not None:
                # Views of a mapping of the file: the bytes are read once (by the hash, when verifying).
                tensors, metadata = tensors_from_buffer(map_file(local), info.file(filename))
                shapes = {k: (tuple(t.shape), None) for k, t in tensors.items()}
                for alias, target in json.loads(metadata.get(ALIASES_KEY, "{}")).items():
                    shapes[alias] = shapes[target]
                if strict:
                    check_model_fits(model, shapes, info.file(filename))
                found[name] = with_aliases(tensors, metadata)
                continue
            with (
                local_copy(info.file(filename), storage=storage) as path,
                safe_open(path, framework="pt") as handle,
            ):
                metadata = handle.metadata() or {}
                shapes = {
                    k: (tuple(handle.get_slice(k).get_shape()), None)
                    for k in handle.keys()  # noqa: SIM118 - safe_open is not a dict
                }
                for alias, target in json.loads(metadata.get(ALIASES_KEY, "{}")).items():
                    shapes[alias] = shapes[target]
                if strict:
                    check_model_fits(model, shapes, info.file(filename))
                tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
        except (StateMismatch, CorruptCheckpoint):
            raise
        except Exception as exc:
            raise CorruptCheckpoint(
                f"{info.file(filename)}: cannot be read ({type(exc).__name__}: {exc}); {_FALLBACK_HINT}"
            ) from exc
        found[name] = with_aliases(tensors, metadata)
    return found


def read_state(storage: Storage, info: CheckpointInfo) -> dict[str, Any] | None:
    """The `state.pt` payload (weights-only unpickling); None for a weights-only checkpoint (a soup)."""
    if STATE_FILE not in info.files:
        if info.kind == "train":
            raise CorruptCheckpoint(f"{info.path}: {STATE_FILE} is missing from meta.json")
        log.warning("%s holds weights only (%s); training state starts fresh", info.name, info.kind)
        return None
    path = info.file(STATE_FILE)
    try:
        local = storage.local_path(path)
        if local is not None:  # mapped: tensors are views of the page cache, not a copy of it
            payload = torch.load(local, map_location="cpu", weights_only=True, mmap=True)
        else:
            with storage.open(path, "rb") as handle:
                payload = torch.load(handle, map_location="cpu", weights_only=True)
        if not isinstance(payload, dict) or payload.get("format") != STATE_FORMAT:
            raise ValueError("not a ladle state file")
    except CorruptCheckpoint:
        raise
    except Exception as exc:
        raise CorruptCheckpoint(
            f"{path}: cannot be read ({type(exc).__name__}: {_first_line(exc)}); {_FALLBACK_HINT}"
        ) from exc
    return payload


def read_ema_weights(storage: Storage, info: CheckpointInfo) -> dict[str, torch.Tensor] | None:
    """The EMA weights from `ema.safetensors`; None when the checkpoint has none.

    A sharded checkpoint's EMA is read whole from its DCP folder, in this one process
    (a local checkpoint; a sharded run restores it resharded through DCP instead).
    """
    from safetensors import safe_open

    filename = f"{EMA_NAME}.safetensors"
    if filename not in info.files:
        if DCP_METADATA in info.files and info.extra.get("ema"):
            return _read_dcp_ema(storage, info)
        return None
    try:
        local = storage.local_path(info.file(filename))
        if local is not None:
            return with_aliases(*tensors_from_buffer(map_file(local), info.file(filename)))
        with (
            local_copy(info.file(filename), storage=storage) as path,
            safe_open(path, framework="pt") as handle,
        ):
            tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
            return with_aliases(tensors, handle.metadata())
    except CorruptCheckpoint:
        raise
    except Exception as exc:
        raise CorruptCheckpoint(f"{info.file(filename)}: cannot be read ({exc}); {_FALLBACK_HINT}") from exc


def _read_dcp_ema(storage: Storage, info: CheckpointInfo) -> dict[str, torch.Tensor]:
    """The full EMA weights of a sharded checkpoint, assembled tensor by tensor from its DCP shards."""
    from ladle.formats.dcp import load_dcp_state_dict

    local = storage.local_path(info.path)
    if local is None:
        raise CorruptCheckpoint(
            f"{info.path}: the EMA of a sharded checkpoint is read from a local folder; copy it first"
        )
    try:
        return load_dcp_state_dict(local, key=EMA_NAME)
    except Exception as exc:
        raise CorruptCheckpoint(
            f"{info.file(DCP_METADATA)}: its EMA weights cannot be read ({_first_line(exc)}); "
            f"{_FALLBACK_HINT}"
        ) from exc


def _first_line(exc: BaseException) -> str:
    return first_line(exc, 120)  # one line, without terminal escape codes


@dataclass(frozen=True)
class CheckpointContents:
    """What `read_checkpoint` read: weights per model, the payload, the EMA weights."""

    models: dict[str, dict[str, torch.Tensor]]
    payload: dict[str, Any] | None
    ema: dict[str, torch.Tensor] | None


def read_checkpoint(
    storage: Storage,
    info: CheckpointInfo,
    models: Mapping[str, nn.Module],
    *,
    strict: bool,
    verify: bool,
    ema: bool,
) -> CheckpointContents:
    """Read everything a resume needs, after checking sizes; with `verify`, checksums are
    recomputed on background threads while the files are read, and any mismatch is a
    CorruptCheckpoint naming the file."""
    for filename in info.files:
        check_readable(storage, info, filename)
    # Checksums on two threads while the files are opened; local files are mapped, and the
    # readers build tensors as views of the same pages, so each byte is read from the page
    # cache once (by the hash) until the live objects copy what they need.
    hashing = ThreadPoolExecutor(max_workers=2, thread_name_prefix="ladle-verify")
    # Another tool's files recorded no checksum: nothing to verify them against.
    checked = {f: c for f, r in info.files.items() if verify and (c := r.checksum()) is not None}
    largest_first = sorted(checked, key=lambda f: -info.files[f].size)
    digests = {
        f: hashing.submit(checksum_mapped, storage, info.file(f), checked[f].algorithm) for f in largest_first
    }
    try:
        contents = CheckpointContents(
            models=read_model_weights(storage, info, models, strict=strict),
            payload=read_state(storage, info),
            ema=read_ema_weights(storage, info) if ema else None,
        )
        for filename, future in digests.items():
            if future.result() != checked[filename].hex:
                raise CorruptCheckpoint(
                    f"{info.file(filename)}: checksum does not match meta.json (corrupted); {_FALLBACK_HINT}"
                )
    finally:
        hashing.shutdown(wait=True)
    return contents


def check_saved_objects(
    info: CheckpointInfo, payload: Mapping[str, Any] | None, live: Iterable[str], *, strict: bool
) -> None:
    """Compare the objects saved in the payload with the `live` names registered now.

    With `strict`, any difference is a StateMismatch listing both sides; without, a warning.
    """
    if payload is None:
        return
    saved = set(payload["objects"]) - {"manager"}
    live = set(live)
    missing, unexpected = sorted(live - saved), sorted(saved - live)
    if (missing or unexpected) and strict:
        parts = []
        if missing:
            parts.append(f"no saved state for {missing}")
        if unexpected:
            parts.append(f"saved state for unregistered {unexpected}")
        raise StateMismatch(
            f"{info.file(STATE_FILE)}: {'; '.join(parts)}; register the same objects as the "
            "saving run, or resume(strict=False) to skip them"
        )
    if missing or unexpected:
        log.warning("resume(strict=False): skipping %s", missing + unexpected)
