"""How ladle's safetensors outputs store tied weights, so they load with the usual one-liner.

A model with tied weights (an embedding shared with the output layer) has one
tensor under several names. safetensors cannot point two names at one byte
range, so a writer either stores the tensor once and records the other names
(`ladle.aliases` metadata: `{alias: stored name}`), or stores a full copy under
every name. The first is smaller, but `model.load_state_dict(load_file(path))`
then misses the aliases and fails in strict mode.

ladle's outputs (averages, soups, exports) therefore default to `tied="copy"`:
every name is stored, and `ladle.aliases` still lists the ties so ladle's own
readers re-tie them (and read each tied tensor once). Where a standard loader
re-ties the weights itself, no copy is needed and none is made: a transformers
folder written by `save_pretrained` leaves the tied names out (the model's
`_tied_weights_keys`), so an average of such folders leaves them out too and
`from_pretrained` ties them again. `tied="alias"` keeps files smallest for
readers that re-tie (`ladle.load_weights`, `ladle.load_source`).

Which loader to use:
- `safetensors.torch.load_file(path)` + `model.load_state_dict(..., strict=True)`:
  every default ladle output (copies of tied names are there);
- `AutoModel*.from_pretrained(folder)`: a soup or average written as a model folder;
- `ladle.load_weights(model, path)`: anything ladle writes, including
  `tied="alias"` files, torch-format files and sharded folders.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ladle.errors import ConfigError

TIED_MODES = ("copy", "alias")


def tied_copies(ties: Mapping[str, str] | None, layout: Mapping[str, Any], tied: str) -> dict[str, list[str]]:
    """{stored name: [aliases stored as copies after it]} for a writer's `ties` and `tied` mode."""
    if tied not in TIED_MODES:
        raise ConfigError(f"tied={tied!r} is not a mode; use one of {', '.join(TIED_MODES)}")
    if tied == "alias" or not ties:
        return {}
    copies: dict[str, list[str]] = {}
    for alias, target in ties.items():
        if alias in layout and target in layout and target not in ties:
            copies.setdefault(target, []).append(alias)
    return copies


__all__ = ["TIED_MODES", "tied_copies"]
