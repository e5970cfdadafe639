"""The record kept with every average: what was averaged, how, and the checksums read.

`provenance()` builds it; it travels inside a safetensors output (the
`ladle.provenance` metadata entry, so an output never exists without it) and,
as a convenience copy, in `<output>.json` beside the output (the only copy for
torch-format outputs, written before the output is moved into place).
`read_provenance(path)` reads it back.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

from ladle._version import __version__
from ladle.averaging.members import Member
from ladle.averaging.plan import AverageOptions, Plan
from ladle.formats.dtypes import dtype_name
from ladle.formats.write import sidecar_path
from ladle.store.paths import path_isfile, read_path

PROVENANCE_FORMAT = "ladle-soup/1"
PROVENANCE_KEY = "ladle.provenance"
"""The safetensors metadata entry holding the record (JSON text)."""


def provenance(
    members: Sequence[Member],
    weights: Sequence[float],
    plan: Plan,
    options: AverageOptions,
    *,
    recipe: str | None,
    weighting: str,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The record written with every average (members' checksums as far as read so far)."""
    output_dtype = options.output_dtype
    return {
        "format": PROVENANCE_FORMAT,
        "ladle_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "recipe": recipe,
        "weighting": weighting,
        "members": [m.record(w) for m, w in zip(members, weights, strict=True)],
        "dtype": dtype_name(output_dtype) if output_dtype else "as members",
        "accumulate": dtype_name(options.accumulator),
        "int_policy": options.policy.value,
        "intersect": options.intersect,
        "keys": len(plan.order),
        "dropped_keys": plan.dropped,
        "tied": dict(plan.ties),
        "batchnorm_layers": plan.batchnorm_layers,
        **dict(extra or {}),
    }


def provenance_metadata(record: Mapping[str, Any]) -> dict[str, str]:
    """safetensors metadata carrying `record`."""
    return {"format": "pt", PROVENANCE_KEY: json.dumps(record, default=str)}


def read_provenance(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The provenance recorded in a safetensors output (or its sidecar), if any."""
    from ladle.formats.safetensors_header import read_header

    text = os.fspath(path)
    side = sidecar_path(text)
    if text.endswith(".safetensors"):
        _, _, metadata = read_header(text)
        if PROVENANCE_KEY in metadata:
            return dict(json.loads(metadata[PROVENANCE_KEY]))
    if path_isfile(side):
        return dict(json.loads(read_path(side)))
    return None


__all__ = ["PROVENANCE_FORMAT", "PROVENANCE_KEY", "provenance", "provenance_metadata", "read_provenance"]
