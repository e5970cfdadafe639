"""What a manager checkpoint holds: the registered objects, the files they become, and back.

Objects are registered by name (`model`, `optimizer`, ... or any `state={name: obj}`).
`nn.Module`s become `<name>.safetensors` (clean keys, tied tensors stored once); a
`ladle.EMA`'s weights become `ema.safetensors`; everything else, with the manager's
own counters, RNG states, config and extras, is the payload `state.pt`, checked
before writing to load with `torch.load(weights_only=True)`, so a checkpoint that
could only be loaded by unpickling code is never written.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from ladle.errors import ConfigError, CorruptCheckpoint
from ladle.saving.engine import FileWriter, safetensors_writer
from ladle.state.model_weights import (
    STATE_FORMAT,
    check_weights_only,
    is_stateful,
    kind_of,
    model_weights,
    tensors_for_safetensors,
)
from ladle.state.readers import EMA_NAME, STATE_FILE
from ladle.state.rng import capture_rng

_OBJECT_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,63}$")
_RESERVED = {"state", "meta", "history", "manager", "ladle"}


def check_object(name: str, obj: Any, registered: Iterable[str]) -> None:
    """Refuse a name that cannot be a file or collides, and an object without state_dict()."""
    if not _OBJECT_NAME.match(name) or name in _RESERVED:
        raise ConfigError(
            f"state name {name!r} is not allowed; use a short identifier other than {sorted(_RESERVED)}"
        )
    if name in registered:
        raise ConfigError(f"state name {name!r} is given twice; use distinct names")
    if not is_stateful(obj):
        raise ConfigError(
            f"state[{name!r}] is a {type(obj).__name__} without state_dict()/load_state_dict(); "
            "wrap it in an object that has both"
        )
    if name == EMA_NAME and kind_of(obj) != "ema":
        raise ConfigError("the name 'ema' is reserved for a ladle.EMA; pick another name")


def build_payload(
    objects: Mapping[str, Any], *, skip: Iterable[str], manager: Mapping[str, Any], where: str, **fields: Any
) -> tuple[dict[str, Any], dict[str, torch.Tensor] | None]:
    """The `state.pt` payload of `objects` (but `skip`) and the EMA's weights, taken out of it.

    `fields` are the manager's counters (`step`, `epoch`, `epoch_complete`, `config`, `extras`).
    """
    skip = set(skip)
    states: dict[str, Any] = {}
    kinds: dict[str, str] = {}
    ema_weights = None
    for name, obj in objects.items():
        if name in skip:
            continue
        state = obj.state_dict()
        if name == EMA_NAME:
            state = dict(state)
            ema_weights = state.pop("weights")
        states[name], kinds[name] = state, kind_of(obj)
    states["manager"], kinds["manager"] = dict(manager), "manager"
    payload = {"format": STATE_FORMAT, "objects": states, "kinds": kinds, "rng": capture_rng(), **fields}
    check_weights_only(payload, where)
    return payload, ema_weights


def checkpoint_files(
    payload: Mapping[str, Any],
    models: Mapping[str, nn.Module],
    ema_weights: Mapping[str, torch.Tensor] | None,
    *,
    copy: Callable[[Any], Any] | None = None,
) -> list[tuple[str, FileWriter]]:
    """The files of a checkpoint: `state.pt`, each model's safetensors, the EMA's.

    `copy` stages what is written (host-memory copies for an asynchronous save).
    """
    own = copy or (lambda value: value)
    staged = own(payload)
    files: list[tuple[str, FileWriter]] = [(STATE_FILE, lambda path: torch.save(staged, path))]
    for name, model in models.items():
        tensors, aliases = model_weights(model)
        files.append((f"{name}.safetensors", safetensors_writer(own(tensors), aliases)))
    if ema_weights is not None:
        tensors, aliases = tensors_for_safetensors(dict(ema_weights))
        files.append((f"{EMA_NAME}.safetensors", safetensors_writer(own(tensors), aliases)))
    return files


def apply_states(
    objects: Mapping[str, Any],
    saved: Mapping[str, Any],
    *,
    skip: Iterable[str],
    ema_weights: Mapping[str, torch.Tensor] | None,
    where: str,
) -> None:
    """Load each saved state into its live object (but `skip`); the EMA gets its weights back."""
    skip = set(skip)
    for name, obj in objects.items():
        if name in skip or name not in saved:
            continue
        state = saved[name]
        if name == EMA_NAME:
            if ema_weights is None:
                raise CorruptCheckpoint(f"{where}: ema.safetensors is missing")
            state = {**state, "weights": ema_weights}
        obj.load_state_dict(state)
