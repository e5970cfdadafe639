"""Exponential moving average (EMA) of a model's weights, updated with foreach kernels.

An EMA keeps a shadow copy of every tensor in `model.state_dict()` and, after each
optimizer step, moves it towards the live weights:
`shadow <- decay * shadow + (1 - decay) * weight`, i.e. `lerp(shadow, weight, 1 - decay)`.

Why it is built this way:
- One `torch._foreach_lerp_` (or `_foreach_copy_`) per (device, dtype) group, never a
  Python loop of per-parameter kernels: on an accelerator that is a handful of kernel
  launches instead of hundreds, and on CPU it avoids per-tensor dispatch overhead.
- The decay is a Python float computed from host-side counters, so an update never reads
  a device value and never forces a device synchronisation.
- With the copy kept on another device (``device="cpu"`` to save accelerator memory),
  weights are copied asynchronously into pinned staging buffers and averaged at the next
  update (or whenever the EMA is read), by which time the copy has long finished.
- Keys are the model's own `state_dict()` keys without the `module.` / `_orig_mod.`
  prefixes of DDP and `torch.compile` wrappers, so the EMA weights load into the bare
  model and every ladle tool can read them like raw weights.
- `state_dict()` / `load_state_dict()` follow torch's Stateful protocol (counters plus
  `"weights"`), so a resumed run continues the average exactly, bit for bit on CPU.
- A sharded model (FSDP2, tensor parallel: DTensor parameters) gets DTensor averages
  sharded like it: each rank averages its own shard, nothing is gathered, and a sharded
  checkpoint saves them through DCP (`ladle.averaging.ema_shards`). `device="cpu"` then
  keeps each rank's local shard in host memory.

The settings and the decay schedule are `ladle.averaging.ema_config.EMAConfig`. This module
is the averaging object alone (its tensor grouping, the update, reading and restoring the
average); it stays one module past ~400 lines because those parts share the groups' layout.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ladle.averaging.ema_config import Buffers, EMAConfig, Warmup
from ladle.averaging.ema_shards import is_dtensor, local, local_part, shard_like
from ladle.errors import ConfigError, StateMismatch
from ladle.state.model_weights import clean_key, unwrap_model
from ladle.validation import check_int

log = logging.getLogger("ladle")

EMA_FORMAT = "ladle-ema/1"


_Slot = tuple[dict[str, Any], str]


def _tensor_slots(model: nn.Module) -> tuple[list[str], list[_Slot], list[bool]]:
    """(names, slots, is_parameter) for every tensor in `model.state_dict()`, in its order.

    A slot is the owning module's `_parameters` / `_buffers` dict and the attribute name:
    reading through it each update sees parameters replaced by `load_state_dict(assign=True)`
    and buffers replaced by `model.to(...)`, which cached tensor references would miss.
    """
    names: list[str] = []
    slots: list[_Slot] = []
    is_param: list[bool] = []
    skipped: list[str] = []
    for key, value in model.state_dict(keep_vars=True).items():
        if not isinstance(value, torch.Tensor):
            continue
        path, _, attr = key.rpartition(".")
        owner = model.get_submodule(path) if path else model
        if attr in owner._parameters and owner._parameters[attr] is not None:
            slots.append((owner._parameters, attr))
            is_param.append(True)
        elif attr in owner._buffers and owner._buffers[attr] is not None:
            slots.append((owner._buffers, attr))
            is_param.append(False)
        else:
            skipped.append(key)
            continue
        names.append(key)
    if skipped:
        log.warning(
            "EMA: %d state_dict entries are not parameters or buffers and are not averaged: %s",
            len(skipped),
            ", ".join(skipped[:5]),
        )
    return names, slots, is_param


@dataclass(kw_only=True)
class _Group:
    """Shadows that share (operation, device, dtype) and are updated by one foreach call."""

    average: bool
    slots: list[_Slot]
    shadows: list[torch.Tensor]
    source_device: torch.device
    source_dtype: torch.dtype
    source_ids: list[int]
    sharded: bool = False
    """Some sources are DTensors: the update reads their local shards."""
    staging: list[torch.Tensor] | None = None
    deferred: bool = False
    pending: list[Any] = field(default_factory=list)


class EMA:
    """Exponential moving average of a model's weights (parameters, optionally buffers).

    Example:
        ema = ladle.EMA(model, decay=0.999, warmup="ratio")
        for batch in data:
            loss.backward(); optimizer.step(); optimizer.zero_grad()
            ema.update()
        with ema.applied(model):
            evaluate(model)                # runs with the averaged weights
        # the raw weights are back, bit for bit

    Pass it to `CheckpointManager(..., ema=ema)` and each checkpoint stores the averaged
    weights as `ema.safetensors`, keyed like the model's state_dict (for a sharded model,
    whose weights are DTensors: in the checkpoint's DCP folder, under `ema`).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        decay: float = 0.999,
        warmup: Warmup | str = Warmup.NONE,
        power: float = 2 / 3,
        every: int = 1,
        start_after: int = 0,
        buffers: Buffers | str = Buffers.COPY,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ConfigError(f"EMA(model=...) needs a torch.nn.Module, got {type(model).__name__}")
        self.config = EMAConfig(
            decay=decay,
            warmup=warmup,  # type: ignore[arg-type]
            power=power,
            every=every,
            start_after=start_after,
            buffers=buffers,  # type: ignore[arg-type]
            device=device,  # type: ignore[arg-type]
            dtype=dtype,
        )
        self.model = unwrap_model(model)
        self.step = 0
        """Steps seen (calls to `update()`, or the last `step=` given)."""
        self.num_updates = 0
        """Averaging updates done so far (the `n` of the warm-up schedule)."""
        names, slots, is_param = _tensor_slots(self.model)
        if not names:
            raise ConfigError("EMA(model=...): the model has no parameters or buffers to average")
        self._names = names
        # Tied weights (one tensor under several names) share one shadow.
        first_of: dict[int, int] = {}
        self._shadow_index: list[int] = []
        self._slots: list[_Slot] = []
        self._is_param: list[bool] = []
        self._shadows: list[torch.Tensor] = []
        for slot, param in zip(slots, is_param, strict=True):
            tensor = slot[0][slot[1]]
            index = first_of.setdefault(id(tensor), len(self._shadows))
            if index == len(self._shadows):
                self._slots.append(slot)
                self._is_param.append(param)
                self._shadows.append(self._new_shadow(tensor.detach()))
            self._shadow_index.append(index)
        self._groups: list[_Group] = []
        self._build_groups()

    # -- construction ------------------------------------------------------------

    def _shadow_place(self, source: torch.Tensor) -> tuple[torch.device, torch.dtype]:
        device = self.config.device or source.device
        dtype = source.dtype
        if self.config.dtype is not None and source.is_floating_point():
            dtype = self.config.dtype
        return device, dtype

    def _new_shadow(self, source: torch.Tensor) -> torch.Tensor:
        device, dtype = self._shadow_place(source)
        return shard_like(source, device, dtype)

    def _averaged(self, index: int) -> bool:
        shadow = self._shadows[index]
        if not (shadow.is_floating_point() or shadow.is_complex()):
            return False  # integer/bool tensors (counters) are copied, never averaged
        return self._is_param[index] or self.config.buffers is Buffers.AVERAGE

    def _build_groups(self) -> None:
        """Group shadows by (average?, shadow place, source place); one foreach call each."""
        self._flush()
        sources = [d[k] for d, k in self._slots]
        members: dict[tuple[Any, ...], list[int]] = {}
        for i, source in enumerate(sources):
            shadow = self._shadows[i]
            if shadow.shape != source.shape:
                raise StateMismatch(
                    f"EMA: {self._name_of(i)} changed shape from {tuple(shadow.shape)} to "
                    f"{tuple(source.shape)}; create a new EMA for the changed model"
                )
            if self.config.device is None and shadow.device != source.device:
                # The model moved (e.g. model.cuda() after EMA(...)); the copy follows it.
                self._shadows[i] = shadow = shard_like(shadow, source.device, shadow.dtype)
            key = (self._averaged(i), shadow.device, shadow.dtype, source.device, source.dtype)
            members.setdefault(key, []).append(i)
        groups = []
        for (average, device, dtype, src_device, src_dtype), index in members.items():
            group = _Group(
                average=average,
                slots=[self._slots[i] for i in index],
                shadows=[local(self._shadows[i]) for i in index],  # a DTensor's own shard
                source_device=src_device,
                source_dtype=src_dtype,
                source_ids=[id(sources[i]) for i in index],
                sharded=any(is_dtensor(sources[i]) for i in index),
            )
            if (device, dtype) != (src_device, src_dtype):
                # An asynchronous copy into pinned memory needs a CUDA source and a CPU target.
                group.deferred = src_device.type == "cuda" and device.type == "cpu"
                group.staging = [
                    torch.empty(s.shape, dtype=s.dtype, device=s.device, pin_memory=group.deferred)
                    for s in group.shadows
                ]
            groups.append(group)
        self._groups = groups
        if any(g.deferred for g in groups):
            log.debug("EMA: %d groups copied asynchronously to %s", len(groups), self.config.device)

    def _name_of(self, index: int) -> str:
        return self._names[self._shadow_index.index(index)]

    # -- updating ----------------------------------------------------------------

    @property
    def decay(self) -> float:
        """The decay the next averaging update will use (after warm-up: `config.decay`)."""
        return self.config.decay_at(self.num_updates)

    @torch.no_grad()
    def update(self, step: int | None = None) -> bool:
        """Fold the model's current weights into the average; call after `optimizer.step()`.

        `step` sets the step counter (e.g. the global step when resuming a run that did
        not use an EMA before); by default each call counts one step. Returns whether
        this call averaged (False while copying before `start_after`, or between
        `every`-th steps).
        """
        self._flush()
        if step is not None:
            check_int("step", step, low=0)
            self.step = int(step)
        else:
            self.step += 1
        cfg = self.config
        if self.step <= cfg.start_after:
            self._apply_all(weight=None)
            return False
        if (self.step - cfg.start_after) % cfg.every:
            return False
        self._apply_all(weight=1.0 - cfg.decay_at(self.num_updates))
        self.num_updates += 1
        return True

    def _current_sources(self) -> list[list[torch.Tensor]]:
        """Each group's live tensors (a DTensor's local shard); regroups when they were replaced or moved."""
        for _ in range(2):
            per_group = [[d[k] for d, k in g.slots] for g in self._groups]
            stale = any(
                g.source_ids != [id(t) for t in src]
                or src[0].device != g.source_device
                or src[0].dtype != g.source_dtype
                for g, src in zip(self._groups, per_group, strict=True)
            )
            if not stale:
                break
            log.debug("EMA: the model's tensors were replaced or moved; regrouping")
            self._build_groups()
        # Decided when grouping: the training step pays no per-tensor check for a plain model.
        return [
            [local(t) for t in src] if g.sharded else src
            for g, src in zip(self._groups, per_group, strict=True)
        ]

    def _apply_all(self, *, weight: float | None) -> None:
        """One foreach call per group: lerp by `weight`, or a copy (weight None / not averaged)."""
        per_group = self._current_sources()  # may regroup, so read the groups after it
        for group, sources in zip(self._groups, per_group, strict=True):
            w = weight if group.average else None
            if group.staging is None:
                _apply(group.shadows, sources, w)
                continue
            torch._foreach_copy_(group.staging, sources, non_blocking=group.deferred)
            if group.deferred:
                event = torch.cuda.Event()
                event.record(torch.cuda.current_stream(group.source_device))
                group.pending.append((event, w))
            else:
                _apply(group.shadows, group.staging, w)

    def _flush(self) -> None:
        """Finish asynchronous updates (their copies were issued a whole step ago)."""
        for group in self._groups:
            if group.staging is None:
                continue
            for event, weight in group.pending:
                event.synchronize()
                _apply(group.shadows, group.staging, weight)
            group.pending.clear()

    # -- using the average -------------------------------------------------------

    def weights(self) -> dict[str, torch.Tensor]:
        """The averaged tensors keyed like the bare model's state_dict (live, not copies).

        For a sharded model they are DTensors sharded like its parameters.
        """
        self._flush()
        pairs = zip(self._names, self._shadow_index, strict=True)
        return {name: self._shadows[i] for name, i in pairs}

    def _targets(self, model: nn.Module | None) -> list[torch.Tensor]:
        target = self.model if model is None else unwrap_model(model)
        live = {clean_key(k): v for k, v in target.state_dict(keep_vars=True).items()}
        missing = [n for n in self._names if n not in live]
        if missing:
            raise StateMismatch(
                f"EMA: the model lacks {len(missing)} averaged tensors ({', '.join(missing[:5])}); "
                "pass the model the EMA was created for"
            )
        tensors = []
        for name, index in zip(self._names, self._shadow_index, strict=True):
            tensor = live[name]
            shadow = self._shadows[index]
            if tensor.shape != shadow.shape or is_dtensor(tensor) != is_dtensor(shadow):
                sharded = {True: " (sharded)", False: ""}
                raise StateMismatch(
                    f"EMA: {name} has shape {tuple(tensor.shape)}{sharded[is_dtensor(tensor)]} in the "
                    f"model but {tuple(shadow.shape)}{sharded[is_dtensor(shadow)]} in the EMA; "
                    "pass the model it was created for"
                )
            tensors.append(local(tensor))
        return tensors

    def _local_shadows(self) -> list[torch.Tensor]:
        """One (local) shadow per name of the model, in `_names` order."""
        return [local(self._shadows[i]) for i in self._shadow_index]

    @torch.no_grad()
    def copy_to(self, model: nn.Module | None = None) -> None:
        """Overwrite the model's weights with the averaged ones (in place)."""
        self._flush()
        targets = self._targets(model)
        torch._foreach_copy_(targets, self._local_shadows())

    @contextlib.contextmanager
    def applied(self, model: nn.Module | None = None) -> Iterator[nn.Module]:
        """Run a block with the averaged weights in the model; the raw ones come back after.

        Weights are copied in place, so optimizers keep their references; the raw
        weights are restored bit for bit, even when the block raises.
        """
        self._flush()
        targets = self._targets(model)
        with torch.no_grad():
            backup = [t.detach().clone() for t in targets]
            torch._foreach_copy_(targets, self._local_shadows())
        try:
            yield self.model if model is None else model
        finally:
            with torch.no_grad():
                torch._foreach_copy_(targets, backup)

    # -- Stateful protocol -------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Counters, settings and `"weights"` (the averaged tensors, keyed like the model)."""
        return {
            "format": EMA_FORMAT,
            **self.config.to_dict(),
            "step": self.step,
            "num_updates": self.num_updates,
            "weights": self.weights(),
        }

    @torch.no_grad()
    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Continue from a saved average; settings that differ from the live ones are logged."""
        if state_dict.get("format", EMA_FORMAT) != EMA_FORMAT:
            raise StateMismatch(
                f"EMA state has format {state_dict.get('format')!r}, expected {EMA_FORMAT!r}; "
                "it was not written by ladle.EMA"
            )
        weights = state_dict.get("weights")
        if not isinstance(weights, Mapping):
            raise StateMismatch(
                "EMA state has no 'weights'; pass the full EMA.state_dict() "
                "(the manager reads them from ema.safetensors)"
            )
        weights = {clean_key(str(k)): v for k, v in weights.items()}
        missing = [n for n in self._names if n not in weights]
        unexpected = sorted(set(weights) - set(self._names))
        if missing or unexpected:
            parts = []
            if missing:
                parts.append(f"missing {len(missing)} ({', '.join(missing[:5])})")
            if unexpected:
                parts.append(f"unexpected {len(unexpected)} ({', '.join(unexpected[:5])})")
            raise StateMismatch(
                f"EMA weights do not fit the model: {'; '.join(parts)}; "
                "load the EMA state saved with this model"
            )
        for name, index in zip(self._names, self._shadow_index, strict=True):
            shape = tuple(weights[name].shape)
            if shape != tuple(self._shadows[index].shape):
                raise StateMismatch(
                    f"EMA weights: {name} has shape {shape} but the model has "
                    f"{tuple(self._shadows[index].shape)}; load the EMA state saved with this model"
                )
        for group in self._groups:
            group.pending.clear()
        first = {}
        for name, index in zip(self._names, self._shadow_index, strict=True):
            first.setdefault(index, weights[name])
        # Weights loaded in place into the shadows themselves (DCP does) need no copy.
        pairs = [(s, first[i]) for i, s in enumerate(self._shadows) if first[i] is not s]
        if pairs:
            torch._foreach_copy_([local(s) for s, _ in pairs], [local_part(w, s) for s, w in pairs])
        saved = {k: state_dict[k] for k in self.config.to_dict() if k in state_dict}
        for key, value in saved.items():
            live = self.config.to_dict()[key]
            if value != live:
                log.warning(
                    "EMA: %s was %r in the checkpoint and is %r now; the average continues with %r",
                    key,
                    value,
                    live,
                    live,
                )
        self.step = int(state_dict.get("step", 0))
        self.num_updates = int(state_dict.get("num_updates", 0))

    def __repr__(self) -> str:
        cfg = self.config
        return (
            f"EMA(decay={cfg.decay}, warmup={cfg.warmup.value!r}, step={self.step}, "
            f"num_updates={self.num_updates}, tensors={len(self._names)})"
        )


def _apply(shadows: list[torch.Tensor], sources: list[torch.Tensor], weight: float | None) -> None:
    if weight is None:
        torch._foreach_copy_(shadows, sources)
    else:
        torch._foreach_lerp_(shadows, sources, weight)
