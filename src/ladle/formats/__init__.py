"""Reading and writing checkpoint tensors in every format ladle understands.

`load_source(path)` opens a safetensors file, a torch pickle, a sharded
transformers folder or a ladle checkpoint as a `TensorSource` that reads one
tensor at a time; `save_tensors(state_dict, path)` writes safetensors or torch
format atomically. See docs/contracts.md for the shape of a source.
"""

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
