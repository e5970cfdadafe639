"""Where the weights sit inside a loaded checkpoint object, and that state dict flattened.

The state dict may be the object itself or sit under a common key (`state_dict` for
Lightning, `model`, `model_state_dict`, `module`, ...; EMA keys only when nothing else
is there); `key=` picks any other, nested with `.` or `/` (`"ema.model"`,
`"ema/model"`). Walking an object is bounded, since a hostile pickle may describe
far more entries than it holds.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch

from ladle.errors import FormatError

log = logging.getLogger("ladle")

# Where state dicts usually live inside a checkpoint dict, in order of preference.
STATE_KEYS = ("state_dict", "model_state_dict", "model", "module", "net", "network")
# Keys that hold EMA weights: chosen by default only when nothing else is there.
# `key="ema"` reads the first present (timm: `state_dict_ema`; others: `model_ema`, `ema_model`, ...).
EMA_KEYS = ("state_dict_ema", "model_ema", "ema_state_dict", "ema_model", "ema")
# Bounds on walking an unpickled object: real state dicts nest a few levels and hold
# at most a few million entries; a hostile file may describe far more.
MAX_DEPTH = 64
MAX_ENTRIES = 10_000_000


def _is_tensor_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and any(isinstance(v, torch.Tensor) for v in obj.values())


def _has_tensors(obj: Any) -> bool:
    """Whether a tensor (or a module) sits anywhere inside `obj`, each container visited once."""
    seen: set[int] = set()
    stack = [(obj, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, torch.Tensor | torch.nn.Module):
            return True
        if isinstance(item, Mapping) and id(item) not in seen and depth < MAX_DEPTH:
            seen.add(id(item))
            stack.extend((v, depth + 1) for v in item.values())
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
        if key == "ema" and isinstance(obj, Mapping) and "ema" not in obj:
            return _ema_weights(obj, path)
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


def _ema_weights(obj: Mapping[Any, Any], path: str) -> tuple[Any, str]:
    """`key="ema"`: the EMA weights under whichever known key the file uses (timm's
    `state_dict_ema`, `model_ema`, `ema_state_dict`, `ema`)."""
    _, nested = _top_level(obj)
    for name in EMA_KEYS:
        if name in nested:
            return obj[name], name
    choices = ", ".join(repr(c) for c in candidate_keys(obj)[:8]) or "none"
    raise FormatError(
        f"{path}: no EMA weights (looked for keys {', '.join(EMA_KEYS)}); keys with tensors: {choices}; "
        "name the key that holds them with key= (--key)"
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
    """Tensors of a (possibly nested) state dict with dotted keys, and skipped non-tensor keys.

    Bounded for hostile files: each dict is visited once (a dict referenced again,
    the trick of a "pickle bomb" that makes a 2 KiB file describe 2^40 entries,
    is skipped as a shared reference), nesting deeper than `MAX_DEPTH` levels or
    more than `MAX_ENTRIES` entries is refused with one line.
    """
    if isinstance(obj, torch.nn.Module):
        obj = obj.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    skipped: list[str] = []
    if not isinstance(obj, Mapping):
        raise FormatError(
            f"{path}: {prefix.rstrip('.') or 'the file'} is a {type(obj).__name__}, not a dict of tensors"
        )
    seen = {id(obj)}
    stack = [(prefix, iter(obj.items()))]
    entries = 0
    while stack:
        base, items = stack[-1]
        for k, v in items:
            entries += 1
            if entries > MAX_ENTRIES:
                where = prefix.rstrip(".") or "the state dict"
                raise FormatError(
                    f"{path}: more than {MAX_ENTRIES:,} entries under {where}; not a state dict ladle reads"
                )
            name = f"{base}{k}"
            if isinstance(v, torch.Tensor):
                tensors[name] = v
                continue
            if not isinstance(v, Mapping | torch.nn.Module):
                skipped.append(name)
                continue
            if id(v) in seen:
                skipped.append(name)  # the same dict again: read once, never walked twice
                continue
            seen.add(id(v))
            if len(stack) >= MAX_DEPTH:
                raise FormatError(
                    f"{path}: nested more than {MAX_DEPTH} levels deep (at {_short(name)}); "
                    "not a state dict ladle reads"
                )
            inner = v.state_dict() if isinstance(v, torch.nn.Module) else v
            stack.append((f"{name}.", iter(inner.items())))
            break
        else:
            stack.pop()
    return tensors, skipped


def _short(name: str, limit: int = 80) -> str:
    return name if len(name) <= limit else f"{name[: limit // 2]}...{name[-limit // 2 :]}"


def scalar_metadata(obj: Any) -> dict[str, Any]:
    """Top-level scalars (`global_step`, `epoch`, timm's `metric`, ...), plus the counters
    fairseq keeps deeper: `num_updates` of its optimizer history, the train iterator's epoch."""
    if not isinstance(obj, Mapping):
        return {}
    found = {
        str(k): v
        for k, v in obj.items()
        if isinstance(v, bool | int | float | str) and not isinstance(k, torch.Tensor)
    }
    history = obj.get("optimizer_history")
    if isinstance(history, list) and history and isinstance(history[-1], Mapping):
        updates = history[-1].get("num_updates")
        if isinstance(updates, int) and not isinstance(updates, bool):
            found.setdefault("num_updates", updates)
    extra = obj.get("extra_state")
    iterator = extra.get("train_iterator") if isinstance(extra, Mapping) else None
    if isinstance(iterator, Mapping) and isinstance(iterator.get("epoch"), int):
        found.setdefault("epoch", iterator["epoch"])
    return found
