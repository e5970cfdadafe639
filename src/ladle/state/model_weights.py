"""Capture and restore the complete training state of named stateful objects.

Models (`nn.Module`) become safetensors weights with clean keys (no DDP `module.`
or `torch.compile` `_orig_mod.` prefixes); everything else (optimizers, schedulers,
grad scaler, samplers, EMA counters, user objects) becomes one payload that
`torch.load(weights_only=True)` reads back, checked at save time so a checkpoint
that could not be loaded safely is never written.
"""

from __future__ import annotations

import collections
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ladle.errors import ConfigError, StateMismatch
from ladle.formats.source import ALIASES_KEY, find_ties, strip_key

STATE_FORMAT = "ladle-state/1"
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def is_stateful(obj: Any) -> bool:
    """Anything with `state_dict()` and `load_state_dict()` can be checkpointed."""
    return callable(getattr(obj, "state_dict", None)) and callable(getattr(obj, "load_state_dict", None))


def kind_of(obj: Any) -> str:
    """A short name for what an object is, recorded so tools can say what a checkpoint holds."""
    from ladle.state.sampler import ResumableDataLoader, ResumableSampler

    checks: list[tuple[type | tuple[type, ...], str]] = [
        (nn.Module, "model"),
        (torch.optim.Optimizer, "optimizer"),
        (torch.optim.lr_scheduler.LRScheduler, "scheduler"),
        (torch.optim.lr_scheduler.ReduceLROnPlateau, "scheduler"),
        ((ResumableSampler, ResumableDataLoader), "sampler"),
    ]
    amp = getattr(torch, "amp", None)
    if amp is not None and hasattr(amp, "GradScaler"):
        checks.append((amp.GradScaler, "grad_scaler"))
    for cls, name in checks:
        if isinstance(obj, cls):
            return name
    type_name = type(obj).__name__
    if type_name == "EMA" and type(obj).__module__.startswith("ladle"):
        return "ema"
    if type_name == "EarlyStopping" and type(obj).__module__.startswith("ladle"):
        return "early_stopping"
    return "object"


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside DDP/DataParallel/torch.compile wrappers."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def clean_key(key: str) -> str:
    """A state-dict key without wrapper prefixes (leading `module.`/`_orig_mod.`, and
    `_orig_mod.` segments of compiled submodules)."""
    return strip_key(key, _WRAPPER_PREFIXES).replace("._orig_mod.", ".")


def model_weights(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Clean-keyed weights of a (possibly wrapped) model, ready for safetensors, plus aliases."""
    state = unwrap_model(model).state_dict()
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise ConfigError(
                f"model state key {key!r} holds a {type(value).__name__}, not a tensor; "
                "keep non-tensor state out of the module's state_dict"
            )
    return tensors_for_safetensors({clean_key(k): v for k, v in state.items()})


def tensors_for_safetensors(
    state: Mapping[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """CPU, contiguous, unshared tensors for safetensors, and the aliases of tied ones.

    safetensors refuses tensors that share memory (tied embeddings): each tied
    tensor is stored once and its other names are recorded as aliases.
    """
    aliases = find_ties(state)
    tensors: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key in aliases:
            continue
        tensor = value.detach()
        if tensor.device.type != "cpu":
            tensor = tensor.to("cpu")
        if not tensor.is_contiguous():
            tensor = tensor.contiguous()
        tensors[key] = tensor
    # Distinct tensors that still overlap one storage (views, slices) get their own copy.
    by_storage: dict[tuple[Any, int], list[str]] = collections.defaultdict(list)
    for key, tensor in tensors.items():
        if tensor.numel():
            by_storage[(tensor.device, tensor.untyped_storage().data_ptr())].append(key)
    for keys in by_storage.values():
        for key in keys[1:]:
            tensors[key] = tensors[key].clone()
        if len(keys) == 1:
            tensor = tensors[keys[0]]
            if tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size():
                tensors[keys[0]] = tensor.clone()
    return tensors, aliases


def with_aliases(
    tensors: dict[str, torch.Tensor], metadata: Mapping[str, str] | None
) -> dict[str, torch.Tensor]:
    """Weights read from safetensors, with aliased (tied) names filled back in."""
    if metadata and ALIASES_KEY in metadata:
        for alias, target in json.loads(metadata[ALIASES_KEY]).items():
            tensors[alias] = tensors[target]
    return tensors


def check_model_fits(
    model: nn.Module, saved: Mapping[str, tuple[tuple[int, ...], torch.dtype]], where: str
) -> None:
    """Raise StateMismatch listing missing, unexpected and mismatched keys before touching the model."""
    live = {clean_key(k): v for k, v in unwrap_model(model).state_dict().items()}
    missing = sorted(set(live) - set(saved))
    unexpected = sorted(set(saved) - set(live))
    mismatched = [
        f"{k} (saved {list(saved[k][0])}, model {list(live[k].shape)})"
        for k in sorted(set(live) & set(saved))
        if tuple(live[k].shape) != tuple(saved[k][0])
    ]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"missing keys {_few(missing)}")
        if unexpected:
            parts.append(f"unexpected keys {_few(unexpected)}")
        if mismatched:
            parts.append(f"shape mismatches {_few(mismatched)}")
        raise StateMismatch(
            f"{where}: the saved weights do not fit the model: {'; '.join(parts)}; "
            "build the same architecture as the run, or load with strict=False"
        )


def _few(items: list[str], limit: int = 6) -> str:
    shown = ", ".join(items[:limit])
    return f"[{shown}{', ...' if len(items) > limit else ''}] ({len(items)})"


def load_model_weights(model: nn.Module, weights: Mapping[str, torch.Tensor], *, strict: bool = True) -> None:
    """Copy clean-keyed weights into a (possibly wrapped) model, in place, on its devices."""
    target = unwrap_model(model)
    live_keys = {clean_key(k): k for k in target.state_dict()}
    remapped = {live_keys.get(k, k): v for k, v in weights.items()}
    result = target.load_state_dict(remapped, strict=strict)
    if not strict and (result.missing_keys or result.unexpected_keys):
        import logging

        logging.getLogger("ladle").warning(
            "loaded with strict=False: %d missing, %d unexpected keys",
            len(result.missing_keys),
            len(result.unexpected_keys),
        )


@dataclass
class SafetyCheck:
    """Walks a payload and names the first value weights-only loading would reject."""

    allowed: tuple[type, ...] = field(
        default_factory=lambda: (
            torch.Tensor,
            int,
            float,
            bool,
            str,
            bytes,
            type(None),
            complex,
            torch.Size,
            torch.dtype,
            torch.device,
        )
    )

    def problem(self, value: Any, path: str) -> str | None:
        # Exact types: subclasses (namedtuples, defaultdict, struct_time) need their class
        # to be unpickled, which weights-only loading refuses.
        if type(value) in self.allowed or isinstance(value, torch.Tensor):
            return None
        if type(value) in (dict, collections.OrderedDict):
            for key, item in value.items():
                if not isinstance(key, int | str | float | bool | type(None) | tuple):
                    return f"{path} has a key of type {type(key).__name__}"
                found = self.problem(item, f"{path}[{key!r}]")
                if found:
                    return found
            return None
        if type(value) in (list, tuple, set):
            for index, item in enumerate(value):
                found = self.problem(item, f"{path}[{index}]")
                if found:
                    return found
            return None
        safe = {getattr(g, "__name__", None) for g in _safe_globals()}
        if type(value).__name__ in safe or isinstance(value, tuple(_safe_types())):
            return None
        return f"{path} is a {type(value).__module__}.{type(value).__qualname__}"


def _safe_globals() -> list[Any]:
    getter = getattr(torch.serialization, "get_safe_globals", None)
    return list(getter()) if getter else []


def _safe_types() -> list[type]:
    return [g for g in _safe_globals() if isinstance(g, type)]


def check_weights_only(payload: Mapping[str, Any], where: str) -> None:
    """Raise ConfigError if `payload` holds something torch.load(weights_only=True) would refuse."""
    problem = SafetyCheck().problem(payload, where)
    if problem:
        raise ConfigError(
            f"{problem}; ladle saves only tensors and plain Python values so that loading never "
            "runs code: convert it in state_dict() (or register it with "
            "torch.serialization.add_safe_globals)"
        )
