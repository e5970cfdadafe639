"""Recomputing BatchNorm statistics after averaging weights.

Averaged weights do not match averaged running means and variances (the
statistics of an average are not the average of the statistics), so a soup of
a network with BatchNorm should see some training data once more with its
statistics reset. `recalibrate_bn` does that, building on
`torch.optim.swa_utils.update_bn` (cumulative averages, momentum restored
after), and adds what real loaders need: batches as dicts or custom
structures (`forward=`), a batch limit, and a count of the layers it reset.

Soups recalibrate through `recalibrate_seeded` (the same pass under a fixed
torch seed, so dropout draws the same masks each time and a soup's written
statistics are exactly those it was scored with) and read the result back with
`batchnorm_buffers`.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn
from torch.optim.swa_utils import update_bn

from ladle.errors import ConfigError

_BatchNorm = nn.modules.batchnorm._BatchNorm


def has_batchnorm(model: nn.Module) -> bool:
    """Whether the model has BatchNorm layers that track running statistics."""
    return any(isinstance(m, _BatchNorm) and m.track_running_stats for m in model.modules())


def recalibrate_bn(
    model: nn.Module,
    loader: Iterable[Any],
    *,
    device: torch.device | str | None = None,
    forward: Callable[[nn.Module, Any], Any] | None = None,
    max_batches: int | None = None,
) -> int:
    """Reset and re-estimate every BatchNorm layer's running statistics from `loader`.

    Batches that are tensors or (input, target) tuples go straight to the model
    (as `update_bn` does); for anything else pass `forward(model, batch)`.
    `max_batches` limits the pass. The model's train/eval mode is restored.
    Returns the number of BatchNorm layers recalibrated (0: nothing to do).
    """
    if max_batches is not None and (not isinstance(max_batches, int) or max_batches < 1):
        raise ConfigError(f"max_batches={max_batches!r} must be a whole number of at least 1")
    layers = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    if not layers:
        return 0
    batches: Iterable[Any] = loader if max_batches is None else itertools.islice(loader, max_batches)
    if forward is None:
        update_bn(batches, model, device=torch.device(device) if device is not None else None)
        return len(layers)
    # A custom forward: the same protocol as update_bn, driving the model through the caller.
    proxy = _Forwarding(model, forward, device)
    update_bn(proxy.inputs(batches), proxy, device=None)
    return len(layers)


RECALIBRATION_SEED = 0
"""The torch seed of a soup's recalibration pass (dropout masks, random augmentations)."""


def recalibrate_seeded(model: nn.Module, loader: Iterable[Any], *, seed: int = RECALIBRATION_SEED) -> int:
    """`recalibrate_bn` under a fixed torch seed; the caller's RNG state (CPU and CUDA) comes back after."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        return recalibrate_bn(model, loader)


def batchnorm_buffers(model: nn.Module, like: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The running statistics of the model's BatchNorm layers, on the CPU, keyed and typed as in `like`.

    Keys are the model's clean state-dict keys (wrapper prefixes removed);
    buffers that `like` does not hold are left out.
    """
    from ladle.state.model_weights import clean_key, unwrap_model

    target = unwrap_model(model)
    out: dict[str, torch.Tensor] = {}
    for name, module in target.named_modules():
        if not (isinstance(module, _BatchNorm) and module.track_running_stats):
            continue
        for buffer in ("running_mean", "running_var", "num_batches_tracked"):
            value = getattr(module, buffer, None)
            key = clean_key(f"{name}.{buffer}" if name else buffer)
            if isinstance(value, torch.Tensor) and key in like:
                out[key] = value.detach().to("cpu", like[key].dtype).clone()
    return out


class _Forwarding(nn.Module):
    """Lets `update_bn` drive a model through a user's `forward(model, batch)`."""

    def __init__(self, model: nn.Module, forward: Callable[[nn.Module, Any], Any], device: Any) -> None:
        super().__init__()
        self.inner = model
        self._forward = forward
        self._device = torch.device(device) if device is not None else None
        # update_bn restores the mode it found on the module it is given.
        self.train(model.training)

    def inputs(self, batches: Iterable[Any]) -> Iterator[Any]:
        # update_bn unwraps lists and tuples; a one-element list keeps the batch whole.
        for batch in batches:
            yield [_to(batch, self._device)]

    def forward(self, batch: Any) -> Any:
        return self._forward(self.inner, batch)


def _to(batch: Any, device: torch.device | None) -> Any:
    if device is None:
        return batch
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: _to(v, device) for k, v in batch.items()}
    if isinstance(batch, list | tuple):
        return type(batch)(_to(v, device) for v in batch)
    return batch
