"""Say which training state a checkpoint holds: optimizer, scheduler, RNG, EMA, ...

Works on what `torch.load(weights_only=True)` returns, on a ladle `state.pt`
payload, and on the stand-in structure `ladle.pickle_scan` builds for pickles
that cannot be loaded safely; nothing here runs code from a file or reads
tensor data. Classification goes by structure first (an optimizer state dict
has `state` and `param_groups`), then by the key's name (`lr_scheduler`,
`model_ema`), because foreign training scripts name things freely.

It stays one module (about 430 lines): classifying an entry and summarizing it in one
line share the same structural tests (optimizer-like, scheduler-like, tensor stand-ins),
and apart they would have to import each other.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

from ladle.state.pickle_scan import Opaque, TensorStub


class StateKind(str, Enum):
    """What one entry of a checkpoint is."""

    WEIGHTS = "weights"
    EMA = "ema"
    OPTIMIZER = "optimizer"
    SCHEDULER = "scheduler"
    GRAD_SCALER = "grad_scaler"
    RNG = "rng"
    EARLY_STOPPING = "early_stopping"
    SAMPLER = "sampler"
    MANAGER = "manager"
    COUNTER = "counter"
    METRICS = "metrics"
    CONFIG = "config"
    CALLBACKS = "callbacks"
    OBJECT = "object"


@dataclass(kw_only=True, frozen=True)
class StateItem:
    """One entry of training state: where it is, what it is, and a one-line summary."""

    name: str
    """Its key in the file (nested keys joined with `.`), or the file name for weight files."""
    kind: StateKind
    summary: str
    tensors: int = 0
    """Tensors inside it (optimizer moments, RNG states, weights)."""
    nbytes: int = 0
    """Bytes of those tensors."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", StateKind(self.kind))

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind.value,
            "summary": self.summary,
            "tensors": self.tensors,
            "nbytes": self.nbytes,
        }


# -- a ladle state.pt ----------------------------------------------------------------


def describe_ladle_state(state: Mapping[str, Any]) -> list[StateItem]:
    """The entries of a ladle `state.pt` payload (see docs/contracts.md)."""
    items: list[StateItem] = []
    objects = state.get("objects") or {}
    kinds = state.get("kinds") or {}
    for name, value in objects.items():
        kind = _ladle_kind(str(kinds.get(name, "object")))
        items.append(_item(f"objects.{name}", kind, value))
    if state.get("rng"):
        items.append(_item("rng", StateKind.RNG, state["rng"]))
    for name in ("step", "epoch"):
        if state.get(name) is not None:
            items.append(StateItem(name=name, kind=StateKind.COUNTER, summary=str(state[name])))
    history = state.get("metrics_history")
    if history:
        items.append(_item("metrics_history", StateKind.METRICS, history))
    if state.get("config"):
        items.append(_item("config", StateKind.CONFIG, state["config"]))
    extras = state.get("extras")
    if extras:
        items.append(_item("extras", StateKind.OBJECT, extras))
    return items


def _ladle_kind(kind: str) -> StateKind:
    try:
        return StateKind(kind)
    except ValueError:
        return StateKind.OBJECT


# -- any other training checkpoint ---------------------------------------------------


def describe_training_dict(obj: Any) -> list[StateItem]:
    """The entries of a foreign training checkpoint (a dict saved with torch.save)."""
    if not isinstance(obj, Mapping) or _tensor_mapping(obj):
        return []  # a bare state dict holds weights only
    return [_item(str(key), classify(str(key), value), value) for key, value in obj.items()]


_COUNTERS = {"epoch", "step", "global_step", "iteration", "iter", "num_updates", "best_epoch"}
_CONFIGS = {"config", "cfg", "args", "hparams", "hyper_parameters", "hyperparameters", "opt"}


def classify(name: str, value: Any) -> StateKind:
    """Which kind of training state `value`, stored under `name`, is."""
    tokens = set(re.split(r"[^a-z0-9]+", name.lower()))
    lowered = name.lower()
    if _optimizer_like(value) or _all(value, _optimizer_like):
        return StateKind.OPTIMIZER
    if _scheduler_like(value) or _all(value, _scheduler_like) or "scheduler" in lowered:
        return StateKind.SCHEDULER
    if _scaler_like(value) or "scaler" in tokens:
        return StateKind.GRAD_SCALER
    if "ema" in tokens or "averaged" in tokens or "swa" in tokens:
        return StateKind.EMA
    if _tensor_mapping(value) or _module(value):
        return StateKind.WEIGHTS
    if "rng" in lowered or "random" in tokens or "generator" in tokens:
        return StateKind.RNG
    if lowered in _COUNTERS and _scalar(value):
        return StateKind.COUNTER
    if "callbacks" in tokens:
        return StateKind.CALLBACKS
    if lowered in _CONFIGS:
        return StateKind.CONFIG
    if "metric" in lowered or "history" in tokens or lowered.startswith("best"):
        return StateKind.METRICS
    if "optim" in lowered:
        return StateKind.OPTIMIZER
    return StateKind.OBJECT


def _all(value: Any, test: Any) -> bool:
    return isinstance(value, list | tuple) and bool(value) and all(test(v) for v in value)


def _optimizer_like(value: Any) -> bool:
    return isinstance(value, Mapping) and "state" in value and "param_groups" in value


def _scheduler_like(value: Any) -> bool:
    return (
        isinstance(value, Mapping) and "last_epoch" in value and ("base_lrs" in value or "_last_lr" in value)
    )


def _scaler_like(value: Any) -> bool:
    return isinstance(value, Mapping) and "scale" in value and "growth_factor" in value


def _real_tensor(value: Any) -> bool:
    # Before torch is imported nothing can be a tensor: checking costs no import (a ladle
    # checkpoint's state.pt is described from its pickle scan, without torch).
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(value, torch.Tensor)


def _module(value: Any) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(value, torch.nn.Module)


def _is_tensor(value: Any) -> bool:
    return isinstance(value, TensorStub) or _real_tensor(value)


def _tensor_mapping(value: Any) -> bool:
    if not isinstance(value, Mapping) or not value:
        return False
    return sum(_is_tensor(v) for v in value.values()) * 2 >= len(value)


def _scalar(value: Any) -> bool:
    return isinstance(value, int | float | str | bool) or value is None


# -- summaries -----------------------------------------------------------------------


def _item(name: str, kind: StateKind, value: Any) -> StateItem:
    count, nbytes = count_tensors(value)
    return StateItem(name=name, kind=kind, summary=summarize(kind, value), tensors=count, nbytes=nbytes)


def count_tensors(value: Any, _depth: int = 0) -> tuple[int, int]:
    """How many tensors (real or stand-in) a nested value holds, and their bytes.

    Each object is counted once however often it is referenced (a hostile pickle
    can reference one dict from 2^40 paths in 2 KiB), and nesting is followed
    20 levels deep at most.
    """
    seen: set[int] = set()
    count = nbytes = 0
    stack = [(value, _depth)]
    while stack:
        item, depth = stack.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        if _real_tensor(item):
            count, nbytes = count + 1, nbytes + item.numel() * item.element_size()
            continue
        if isinstance(item, TensorStub):
            count, nbytes = count + 1, nbytes + item.nbytes
            continue
        if depth > 20:
            continue
        children: Any = ()
        if isinstance(item, Mapping):
            children = item.values()
        elif isinstance(item, list | tuple):
            children = item
        elif _module(item):
            children = item.state_dict().values()
        elif isinstance(item, Opaque):
            children = [item.args, item.state, item.items, item.list]
        stack.extend((child, depth + 1) for child in children)
    return count, nbytes


def summarize(kind: StateKind, value: Any) -> str:
    """One line about `value`, knowing what kind of state it is."""
    if isinstance(value, Opaque):
        return f"{opaque_name(value)} object (loading it needs --trust)"
    if kind is StateKind.OPTIMIZER:
        if isinstance(value, list | tuple):
            parts = [_optimizer(v) for v in value]
            return f"{len(parts)} optimizers: " + "; ".join(parts)
        return _optimizer(value)
    if kind is StateKind.SCHEDULER:
        if isinstance(value, list | tuple):
            return f"{len(value)} schedulers: " + "; ".join(_scheduler(v) for v in value)
        return _scheduler(value)
    if kind is StateKind.GRAD_SCALER and isinstance(value, Mapping):
        return _fields(value, ("scale", "_growth_tracker", "growth_interval"))
    if kind is StateKind.RNG:
        return _rng(value)
    if kind is StateKind.EMA:
        return _ema(value)
    if kind is StateKind.MANAGER and isinstance(value, Mapping):
        return _manager(value)
    if kind is StateKind.WEIGHTS:
        return _weights(value)
    if kind is StateKind.METRICS and isinstance(value, list):
        return _history(value)
    if kind is StateKind.CALLBACKS and isinstance(value, Mapping):
        names = [str(k).split("{", 1)[0] for k in value]
        return f"{len(names)} callbacks: {', '.join(names[:6])}"
    if _scalar(value):
        return repr(value)
    if isinstance(value, Mapping):
        return _fields(value, ()) if value else "empty"
    if isinstance(value, list | tuple):
        return f"{type(value).__name__} of {len(value)}"
    if _is_tensor(value):
        return _tensor_text(value)
    return type(value).__name__


def opaque_name(value: Opaque) -> str:
    """The class an Opaque stands in for (seeing through copyreg/numpy reconstructors)."""
    name = value.global_name
    if name.endswith(("._reconstructor", "._reconstruct")) and value.args:
        inner = value.args[0]
        if isinstance(inner, type) and issubclass(inner, Opaque):
            return inner.global_name
    return name


def _tensor_text(value: Any) -> str:
    dtype = str(value.dtype).replace("torch.", "") if value.dtype is not None else "?"
    return f"tensor {list(value.shape)} {dtype}"


def _optimizer(value: Any) -> str:
    if not isinstance(value, Mapping):
        return type(value).__name__
    groups = value.get("param_groups") or []
    state = value.get("state") or {}
    params = sum(len(g.get("params", [])) for g in groups if isinstance(g, Mapping))
    slots: list[str] = []
    for entry in state.values() if isinstance(state, Mapping) else []:
        if isinstance(entry, Mapping):
            for key in entry:
                if str(key) not in slots:
                    slots.append(str(key))
    family = _optimizer_family(slots)
    text = f"{family}{len(groups)} param group{'s' if len(groups) != 1 else ''}, "
    text += f"state for {len(state)} of {params} params"
    if slots:
        text += f" ({', '.join(slots)})"
    lrs = [g.get("lr") for g in groups if isinstance(g, Mapping) and "lr" in g]
    if lrs:
        text += f", lr {_number(lrs[0])}" + (" ..." if len(set(map(str, lrs))) > 1 else "")
    return text


def _optimizer_family(slots: Sequence[str]) -> str:
    if "exp_avg" in slots and "exp_avg_sq" in slots:
        return "Adam-style: "
    if "momentum_buffer" in slots:
        return "SGD with momentum: "
    if "square_avg" in slots:
        return "RMSprop-style: "
    return ""


def _scheduler(value: Any) -> str:
    if not isinstance(value, Mapping):
        return type(value).__name__
    inner = value.get("scheduler") if "scheduler" in value else value  # Lightning's wrapper
    if not isinstance(inner, Mapping):
        return type(inner).__name__
    text = f"last_epoch {inner.get('last_epoch')}"
    last = inner.get("_last_lr")
    if isinstance(last, list | tuple) and last:
        text += f", last lr {_number(last[0])}"
    hints = [
        f"{k}={_number(v)}"
        for k, v in inner.items()
        if not str(k).startswith("_")
        and str(k) not in ("last_epoch", "base_lrs", "verbose")
        and isinstance(v, int | float)
        and not isinstance(v, bool)
    ]
    if hints:
        text += f" ({', '.join(hints[:3])})"
    return text


def _rng(value: Any) -> str:
    if _is_tensor(value):
        return "torch RNG state"
    if isinstance(value, Mapping):
        parts = []
        for key, item in value.items():
            if isinstance(item, list | tuple) and item and all(_is_tensor(i) for i in item):
                parts.append(f"{key} ({len(item)} device{'s' if len(item) != 1 else ''})")
            else:
                parts.append(str(key))
        return "RNG states: " + ", ".join(parts)
    if isinstance(value, list | tuple):
        return f"{len(value)} RNG states"
    return type(value).__name__


def _ema(value: Any) -> str:
    if _tensor_mapping(value) or _module(value):
        return "EMA weights: " + _weights(value)
    if isinstance(value, Mapping):
        parts = []
        if "decay" in value:
            parts.append(f"decay {_number(value['decay'])}")
        warmup = value.get("warmup")
        if warmup not in (None, "none"):
            parts.append(f"warm-up {warmup}")
        if "num_updates" in value:
            parts.append(f"{value['num_updates']} averaging updates")
        if "step" in value:
            parts.append(f"{value['step']} update() calls")
        nested = [k for k, v in value.items() if _tensor_mapping(v)]
        if nested:
            parts.append(f"weights under {', '.join(map(str, nested))}")
        return ", ".join(parts) if parts else _fields(value, ())
    return type(value).__name__


def _manager(value: Mapping[str, Any]) -> str:
    parts = [f"global step {value.get('global_step')}", f"epoch {value.get('epoch')}"]
    best = value.get("best")
    if isinstance(best, Mapping) and best.get("name"):
        parts.append(f"best {best['name']} ({_number(best.get('value'))})")
    if value.get("resumed_from"):
        parts.append(f"resumed from {value['resumed_from']}")
    kept = value.get("kept")
    if isinstance(kept, list):
        parts.append(f"{len(kept)} checkpoint{'s' if len(kept) != 1 else ''} kept")
    return ", ".join(parts)


def _weights(value: Any) -> str:
    if _module(value):
        value = value.state_dict()
    tensors = [v for v in value.values() if _is_tensor(v)] if isinstance(value, Mapping) else []
    numel = sum(t.numel() if _real_tensor(t) else t.numel for t in tensors)
    dtypes = sorted({str(t.dtype).replace("torch.", "") for t in tensors if t.dtype is not None})
    return f"{len(tensors)} tensors, {format_count(numel)} elements ({', '.join(dtypes) or '?'})"


def _history(records: list[Any]) -> str:
    text = f"{len(records)} records"
    last = records[-1] if records else None
    if isinstance(last, Mapping) and isinstance(last.get("metrics"), Mapping):
        shown = ", ".join(f"{k}={_number(v)}" for k, v in list(last["metrics"].items())[:3])
        text += f"; last at step {last.get('step')}: {shown}"
    return text


def _fields(value: Mapping[Any, Any], preferred: Sequence[str], limit: int = 4) -> str:
    keys = [k for k in preferred if k in value] or list(value)
    parts = []
    for key in keys[:limit]:
        item = value[key]
        if _scalar(item):
            parts.append(f"{key}={_number(item)}")
        elif _is_tensor(item):
            parts.append(f"{key}=<{_tensor_text(item)}>")
        elif isinstance(item, Opaque):
            parts.append(f"{key}=<{opaque_name(item)}>")
        else:
            parts.append(f"{key}=<{type(item).__name__}>")
    more = 0 if preferred and keys != list(value) else len(value) - min(len(keys), limit)
    return ", ".join(parts) + (f", ... ({more} more)" if more > 0 else "")


def _number(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if _real_tensor(value) and value.numel() == 1:
        return f"{value.item():.6g}"
    return str(value)


def format_count(n: int) -> str:
    """1234567 -> "1.23M": element counts for people."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return str(n)
