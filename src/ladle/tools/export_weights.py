"""The safetensors export: a checkpoint's weights (raw or EMA, optionally cast) as one file.

Only tensors are kept: optimizer state, RNG and the rest of the training state are
dropped. Streamed tensor by tensor through the verified reader, so a checkpoint of
any size exports in constant memory and a file that changes while it is read is
refused before the output is moved into place.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import torch

from ladle._version import __version__
from ladle.averaging.integrity import VerifiedReader
from ladle.errors import ConfigError, FormatError
from ladle.formats import TensorInfo, TensorSource, atomic_path, load_source
from ladle.formats.state_dicts import EMA_KEYS
from ladle.formats.write import SafetensorsWriter, output_location
from ladle.store.paths import path_file_sizes, path_isfile, path_kind, path_size
from ladle.store.refs import resolve_checkpoint
from ladle.tools.export_spec import ExportDtype, ExportResult, ExportTarget, parse_cast

log = logging.getLogger("ladle")


def _weights_label(ema: bool, key: str | None) -> str | None:
    if ema and key not in (None, "ema"):
        raise ConfigError(f"ema=True and key={key!r} ask for different weights; give one of them")
    return "ema" if ema else key


def open_weights(
    checkpoint: str | os.PathLike[str],
    *,
    ema: bool = False,
    key: str | None = None,
    strip_prefix: str | Sequence[str] | None = (),
    trust: bool = False,
) -> tuple[TensorSource, str]:
    """The weights to export and their label; `ema=True` finds EMA weights in any format."""
    checkpoint = resolve_checkpoint(checkpoint)
    chosen = _weights_label(ema, key)
    if chosen != "ema" or _is_ladle_checkpoint(checkpoint):
        source = load_source(checkpoint, key=chosen, strip_prefix=strip_prefix, trust=trust)
        return source, chosen or "model"
    for candidate in EMA_KEYS:
        try:
            source = load_source(checkpoint, key=candidate, strip_prefix=strip_prefix, trust=trust)
        except FormatError as exc:
            if "no key" in str(exc) or "no tensors under" in str(exc):
                continue
            raise
        return source, getattr(source, "found_under", None) or candidate
    raise FormatError(
        f"{os.fspath(checkpoint)}: no EMA weights (looked for keys {', '.join(EMA_KEYS)}); "
        "name the key that holds them with key= (--key)"
    )


def _is_ladle_checkpoint(path: str | os.PathLike[str]) -> bool:
    return path_isfile(os.path.join(os.fspath(path), "meta.json"))


def on_disk_bytes(path: str | os.PathLike[str]) -> int:
    """Bytes of a file, or of every file in a folder (a checkpoint with all its state); path or URL."""
    kind = path_kind(path)
    if kind == "file":
        return path_size(path)
    return sum(path_file_sizes(path).values()) if kind == "dir" else 0


def _cast(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    if dtype is not None and tensor.is_floating_point() and tensor.dtype != dtype:
        return tensor.to(dtype)
    return tensor


def export_weights(
    checkpoint: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    ema: bool = False,
    key: str | None = None,
    dtype: ExportDtype | str | None = None,
    strip_prefix: str | Sequence[str] | None = (),
    trust: bool = False,
    force: bool = False,
) -> ExportResult:
    """Write the checkpoint's weights (raw or EMA, optionally cast) as one safetensors file.

    Only tensors are kept: optimizer state, RNG and the rest of the training
    state are dropped. Tied tensors are stored once (`ladle.aliases` metadata).
    The header records where the weights came from (`ladle.source`, `ladle.weights`,
    `ladle.step`).
    """
    checkpoint = resolve_checkpoint(checkpoint)
    cast = parse_cast(dtype)
    target_dtype = cast.torch if cast else None
    source, label = open_weights(checkpoint, ema=ema, key=key, strip_prefix=strip_prefix, trust=trust)
    with source:
        layout = {}
        for name in source:
            shape, stored = source.info(name)
            is_float = stored.is_floating_point
            layout[name] = TensorInfo(shape, target_dtype if target_dtype and is_float else stored)
        metadata = {
            "ladle.source": output_location(checkpoint),
            "ladle.weights": label,
            "ladle.version": __version__,
        }
        if source.step is not None:
            metadata["ladle.step"] = str(source.step)
        if cast:
            metadata["ladle.dtype"] = cast.value
        reader = VerifiedReader(source)
        with atomic_path(output, force=force) as tmp:
            writer = SafetensorsWriter(tmp, layout, metadata=metadata, ties=source.ties())
            try:
                for name in writer.order:
                    writer.write(name, _cast(reader.tensor(name), target_dtype))
                    source.release(name)
            finally:
                writer.close()
            # The bytes exported are the bytes hashed: a changed file is refused before the rename.
            reader.check()
        numel = sum(layout[k].numel for k in writer.order)
        count = len(layout)
    final = output_location(output)
    result = ExportResult(
        source=output_location(checkpoint),
        output=final,
        target=ExportTarget.SAFETENSORS,
        weights=label,
        dtype=cast.value if cast else None,
        tensors=count,
        numel=numel,
        bytes_before=on_disk_bytes(checkpoint),
        bytes_after=path_size(final),
    )
    log.info("exported %s weights of %s to %s", label, checkpoint, final)
    return result
