"""Reading and writing checkpoint tensors in every format ladle understands.

`load_source(path)` opens a safetensors file, a torch pickle, a sharded
transformers folder or a ladle checkpoint as a `TensorSource` that reads one
tensor at a time; `save_tensors(state_dict, path)` writes safetensors or torch
format atomically. See docs/contracts.md for the shape of a source.
"""

import importlib
from typing import TYPE_CHECKING, Any

# Public name -> the module that defines it, imported on first use (PEP 562): reading a
# safetensors header must not pay for importing torch, which writing and pickles need.
_EXPORTS: dict[str, str] = {
    "HF_WEIGHT_FILES": "ladle.formats.load",
    "load_source": "ladle.formats.load",
    "COMMON_PREFIXES": "ladle.formats.source",
    "DictSource": "ladle.formats.source",
    "PrefixStripped": "ladle.formats.source",
    "TensorInfo": "ladle.formats.source",
    "TensorSource": "ladle.formats.source",
    "find_ties": "ladle.formats.source",
    "strip_key": "ladle.formats.source",
    "OutputFormat": "ladle.formats.write",
    "SafetensorsWriter": "ladle.formats.write",
    "atomic_path": "ladle.formats.write",
    "output_format": "ladle.formats.write",
    "save_tensors": "ladle.formats.write",
    "sidecar_path": "ladle.formats.write",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'ladle.formats' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


if TYPE_CHECKING:
    from ladle.formats.load import HF_WEIGHT_FILES, load_source
    from ladle.formats.source import (
        COMMON_PREFIXES,
        DictSource,
        PrefixStripped,
        TensorInfo,
        TensorSource,
        find_ties,
        strip_key,
    )
    from ladle.formats.write import (
        OutputFormat,
        SafetensorsWriter,
        atomic_path,
        output_format,
        save_tensors,
        sidecar_path,
    )

__all__ = [
    "COMMON_PREFIXES",
    "HF_WEIGHT_FILES",
    "DictSource",
    "OutputFormat",
    "PrefixStripped",
    "SafetensorsWriter",
    "TensorInfo",
    "TensorSource",
    "atomic_path",
    "find_ties",
    "load_source",
    "output_format",
    "save_tensors",
    "sidecar_path",
    "strip_key",
]
