"""`ladle.load_weights(model, path)`: put the weights of anything ladle writes or reads into a model.

The one-liners users know each cover part of what ladle writes:
`model.load_state_dict(safetensors.torch.load_file(path))` reads every default
ladle output (tied names are stored as copies, see `ladle.formats.tied_outputs`)
but not a `tied="alias"` file, a sharded folder, a torch pickle's nested state
dict or a ladle checkpoint folder; `from_pretrained` reads model folders only.
`load_weights` reads every one of them through `ladle.load_source` (one
tensor at a time, no code from the file unless `trust=True`), re-ties tied
names, fills in names the model ties itself that the file left out (as
`save_pretrained` does for `lm_head.weight`), and loads strictly by default,
listing every missing, unexpected and mis-shaped key at once.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from torch import nn

from ladle.errors import StateMismatch
from ladle.formats import COMMON_PREFIXES, find_ties, load_source
from ladle.state.model_weights import check_model_fits, clean_key, load_model_weights, unwrap_model
from ladle.store.refs import resolve_checkpoint


def load_weights(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    key: str | None = None,
    strict: bool = True,
    strip_prefix: str | Sequence[str] | None = None,
    trust: bool = False,
) -> nn.Module:
    """Load the weights at `path` into `model` (in place, on the model's devices); returns `model`.

    `path`: a safetensors file (ties by copy or by `ladle.aliases`), a torch
    pickle (the state dict found as `ladle.load_source` finds it), a model
    folder (sharded or not), a ladle checkpoint folder or `RUN/best`-style
    reference. `key` picks the weights (`"ema"` for EMA weights). Wrapper
    prefixes (`module.`, `_orig_mod.`, Lightning's `model.`) are removed when
    that makes the file's names match the model's; `strip_prefix` names them
    explicitly instead. With `strict=True`, any missing, unexpected or mis-shaped key
    raises `StateMismatch` before the model is changed.
    """
    target = resolve_checkpoint(path)
    with load_source(target, key=key, strip_prefix=strip_prefix, trust=trust) as source:
        ties = source.ties()
        weights = {k: source.tensor(k) for k in source if k not in ties}
    for alias, stored in ties.items():
        weights[alias] = weights[stored]
    if strip_prefix is None:
        weights = _match_prefix(model, weights)
    _fill_model_ties(model, weights)
    if strict:
        shapes = {k: (tuple(v.shape), v.dtype) for k, v in weights.items()}
        check_model_fits(model, shapes, os.fspath(target))
    try:
        load_model_weights(model, weights, strict=strict)
    except RuntimeError as exc:  # a dtype or shape torch refuses after the check above
        first = str(exc).strip().splitlines()[0]
        raise StateMismatch(f"{os.fspath(target)}: does not fit the model ({first})") from None
    return model


def _match_prefix(model: nn.Module, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The weights with the one common wrapper prefix removed that makes most names match the model."""
    live = {clean_key(k) for k in unwrap_model(model).state_dict()}
    best, best_hits = weights, len(live & set(weights))
    for prefix in COMMON_PREFIXES:
        stripped = {k.removeprefix(prefix): v for k, v in weights.items()}
        hits = len(live & set(stripped))
        if hits > best_hits and len(stripped) == len(weights):
            best, best_hits = stripped, hits
    return best


def _fill_model_ties(model: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Names the model ties itself (shared parameters) that the file leaves out get their partner's
    tensor, as `from_pretrained` does for `_tied_weights_keys`."""
    live = {clean_key(k): v for k, v in unwrap_model(model).state_dict(keep_vars=True).items()}
    for alias, stored in find_ties(live).items():
        if alias not in weights and stored in weights:
            weights[alias] = weights[stored]
        elif stored not in weights and alias in weights:
            weights[stored] = weights[alias]


__all__ = ["load_weights"]
