"""The front doors of averaging: `average()` (a state dict) and `average_to_file()`.

Both open the members, verify them while averaging (each member's checksum is
taken from the very bytes the average reads and compared with the checksum its
run recorded; `skip_corrupt` leaves a corrupted member out with a warning
instead of refusing), and record provenance. `average_to_file` streams
safetensors (or builds torch format in memory) into a temporary file that
replaces the output only when complete and verified; the provenance is inside
the safetensors output and also written to `<output>.json` before the output is
moved into place, so an output never exists without its provenance. On a URL
both are uploaded, the sidecar first (`ladle.formats.write.atomic_path`).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ladle.averaging.engine import Averager, Progress
from ladle.averaging.int_policies import IntPolicy
from ladle.averaging.integrity import Mismatch, drop_corrupt
from ladle.averaging.members import InputLike, Member, close_members, note_identical, open_members
from ladle.averaging.plan import AverageOptions, Plan, build_plan, warn_batchnorm
from ladle.averaging.provenance import PROVENANCE_FORMAT, provenance, provenance_metadata
from ladle.averaging.weights import Weighting, WeightsLike, parse_weights
from ladle.formats.write import (
    OutputFormat,
    SafetensorsWriter,
    atomic_path,
    check_destination,
    output_exists,
    output_format,
    sidecar_path,
    write_json,
)
from ladle.store.paths import read_path

log = logging.getLogger("ladle")

_HEADER_ROOM_PER_FILE = 160
"""Header bytes reserved per member file for the checksums known only at the end."""


def resolve_weights(members: Sequence[Member], weights: WeightsLike) -> tuple[Weighting, list[float]]:
    """The weighting and the normalized weights of open members."""
    weighting = parse_weights(weights)
    return weighting, weighting(members)


class _Corrupt(Exception):
    """Some members' bytes differ from their recorded checksums (raised inside a write to abort it)."""

    def __init__(self, mismatches: list[Mismatch]) -> None:
        super().__init__(len(mismatches))
        self.mismatches = mismatches


def _skipped(members: Sequence[Member], kept: Sequence[Member]) -> list[str]:
    ids = {id(m) for m in kept}
    return [m.label for m in members if id(m) not in ids]


def average_members(
    members: Sequence[Member],
    *,
    weights: WeightsLike = "uniform",
    options: AverageOptions | None = None,
    verify: bool = True,
    skip_corrupt: bool = False,
    progress: Progress | None = None,
    bn_warning: bool = True,
) -> tuple[dict[str, torch.Tensor], Plan, list[float], list[Member]]:
    """The average of open members as a state dict (ties shared), its plan, the normalized
    weights and the members used (corrupted ones left out with `skip_corrupt`)."""
    options = options or AverageOptions()
    used = list(members)
    while True:
        weighting, normalized = resolve_weights(used, weights)
        plan = build_plan(used, options)
        if bn_warning:  # off when the caller recalibrates the statistics
            warn_batchnorm(plan, len(used))
        with Averager(
            used, normalized, plan, options, uniform=weighting.uniform, hashing=verify, progress=progress
        ) as averager:
            stored = dict(averager.stream(list(plan.keys), copy=True))
            mismatches = averager.finish()
        if not mismatches:
            break
        used = drop_corrupt(used, mismatches, skip=skip_corrupt)
    note_identical(used)
    state = {k: stored[plan.ties.get(k, k)] for k in plan.order}
    return state, plan, normalized, used


def average(
    inputs: Sequence[InputLike],
    *,
    weights: WeightsLike = "uniform",
    dtype: str | torch.dtype | None = None,
    accumulate: str | torch.dtype = "float32",
    int_policy: IntPolicy | str = IntPolicy.NEWEST,
    intersect: bool = False,
    key: str | None = None,
    strip_prefix: str | Sequence[str] | None = (),
    trust: bool = False,
    dedupe: bool = True,
    verify: bool = True,
    skip_corrupt: bool = False,
    progress: Progress | None = None,
) -> dict[str, torch.Tensor]:
    """The weighted average of checkpoints, as a state dict in memory.

    `inputs`: paths, globs, folders, runs (`RUN` or `RUN@REF`), state dicts or
    open `TensorSource`s. `weights`: "uniform", numbers, "softmax:METRIC:min|max[:T]"
    or "recency:HALF_LIFE". `verify`: hash each member as it is read and refuse
    one whose bytes differ from the checksum its run recorded (`skip_corrupt`
    leaves it out with a warning). Use `average_to_file` to average checkpoints
    larger than memory.
    """
    options = AverageOptions(dtype=dtype, accumulate=accumulate, int_policy=int_policy, intersect=intersect)
    members = open_members(inputs, key=key, strip_prefix=strip_prefix, trust=trust, dedupe=dedupe)
    try:
        state, _, _, _ = average_members(
            members,
            weights=weights,
            options=options,
            verify=verify,
            skip_corrupt=skip_corrupt,
            progress=progress,
        )
    finally:
        close_members(members)
    return state


@dataclass(kw_only=True)
class AverageResult:
    """What `average_to_file` wrote and how."""

    path: str
    """The output file."""
    sidecar: str
    """The provenance JSON beside it ("" when none was written)."""
    provenance: dict[str, Any]
    """Recipe, members (path, step, checksums of the bytes read, weight), dtypes, policies, ladle version."""
    members: list[Member] = field(default_factory=list, repr=False)
    """The members averaged, in order (corrupted ones left out with `skip_corrupt`); their
    sources are closed once `average_to_file` returns."""

    @property
    def weights(self) -> list[float]:
        return [m["weight"] for m in self.provenance["members"]]


def check_outputs(output: str | os.PathLike[str], *, force: bool, sidecar: bool = True) -> str:
    """The absolute output path, if it (and its provenance sidecar) may be written.

    A sidecar whose output does not exist is a leftover of a writer killed
    between the two (the sidecar is written first): it is replaced.
    """
    final = check_destination(output, force=force)
    side = sidecar_path(final)
    if sidecar:
        orphan = not output_exists(final) and _is_provenance(side)
        check_destination(side, force=force or orphan)
    return final


def _is_provenance(path: str) -> bool:
    """Whether `path` (a file or URL) holds ladle provenance; False when it is missing or unreadable."""
    try:
        return bool(json.loads(read_path(path)).get("format") == PROVENANCE_FORMAT)
    except (OSError, ValueError, AttributeError):
        return False


def write_average(
    members: Sequence[Member],
    output: str | os.PathLike[str],
    *,
    weights: WeightsLike = "uniform",
    options: AverageOptions | None = None,
    format: OutputFormat | str | None = None,
    force: bool = False,
    recipe: str | None = None,
    extra: Mapping[str, Any] | None = None,
    sidecar: bool = True,
    verify: bool = True,
    skip_corrupt: bool = False,
    progress: Progress | None = None,
) -> AverageResult:
    """Average open members into `output` (see `average_to_file`)."""
    options = options or AverageOptions()
    chosen = output_format(output, format)
    final = check_outputs(output, force=force, sidecar=sidecar)
    side = sidecar_path(final)
    destination = _Destination(final=final, sidecar=side if sidecar else None, format=chosen, force=force)
    used = list(members)
    while True:
        noted = dict(extra or {})
        if len(used) < len(members):
            noted["skipped_corrupt"] = _skipped(members, used)
        try:
            record = _write_once(
                used,
                destination,
                weights=weights,
                options=options,
                recipe=recipe,
                extra=noted,
                verify=verify,
                progress=progress,
            )
            break
        except _Corrupt as corrupt:
            used = drop_corrupt(used, corrupt.mismatches, skip=skip_corrupt)
    note_identical(used)
    log.info("wrote the average of %d checkpoints to %s", len(used), final)
    return AverageResult(path=final, sidecar=side if sidecar else "", provenance=record, members=used)


@dataclass(frozen=True, kw_only=True)
class _Destination:
    """Where one average goes: the output, its sidecar (None: none), format, replacing."""

    final: str
    sidecar: str | None
    format: OutputFormat
    force: bool


def _write_once(
    members: Sequence[Member],
    destination: _Destination,
    *,
    weights: WeightsLike,
    options: AverageOptions,
    recipe: str | None,
    extra: Mapping[str, Any],
    verify: bool,
    progress: Progress | None,
) -> dict[str, Any]:
    """One pass: average, verify, write the provenance, move the output into place."""
    weighting, normalized = resolve_weights(members, weights)
    plan = build_plan(members, options)
    warn_batchnorm(plan, len(members))

    def record() -> dict[str, Any]:
        return provenance(
            members, normalized, plan, options, recipe=recipe, weighting=str(weighting), extra=extra
        )

    with (
        atomic_path(destination.final, force=destination.force) as tmp,
        Averager(
            members, normalized, plan, options, uniform=weighting.uniform, hashing=verify, progress=progress
        ) as averager,
    ):
        if destination.format is OutputFormat.SAFETENSORS:
            room = _HEADER_ROOM_PER_FILE * sum(max(1, len(m.source.files)) for m in members) + 256
            writer = SafetensorsWriter(
                tmp, plan.layout, metadata=provenance_metadata(record()), ties=plan.ties, reserve=room
            )
            try:
                averager.write_to(writer)
                mismatches = averager.finish()
                if mismatches:
                    raise _Corrupt(mismatches)
                final_record = record()
                writer.finish(metadata=provenance_metadata(final_record))
            finally:
                writer.close()
        else:
            stored = dict(averager.stream(list(plan.keys), copy=True))
            mismatches = averager.finish()
            if mismatches:
                raise _Corrupt(mismatches)
            final_record = record()
            torch.save({k: stored[plan.ties.get(k, k)] for k in plan.order}, tmp)
            del stored
        if destination.sidecar is not None:
            # Before the output is moved into place: an output never exists without it.
            write_json(destination.sidecar, final_record, force=True)
    return final_record


def average_to_file(
    inputs: Sequence[InputLike],
    output: str | os.PathLike[str],
    *,
    weights: WeightsLike = "uniform",
    dtype: str | torch.dtype | None = None,
    accumulate: str | torch.dtype = "float32",
    int_policy: IntPolicy | str = IntPolicy.NEWEST,
    intersect: bool = False,
    key: str | None = None,
    strip_prefix: str | Sequence[str] | None = (),
    trust: bool = False,
    dedupe: bool = True,
    hash_files: bool = True,
    skip_corrupt: bool = False,
    format: OutputFormat | str | None = None,
    force: bool = False,
    recipe: str | None = None,
    progress: Progress | None = None,
) -> AverageResult:
    """Average checkpoints into `output`, streaming: memory stays at about one tensor per member.

    safetensors output (the default, or a `.safetensors` name) is written as the
    average is computed; torch format (`format="torch"` or a `.pt` name) is
    built in memory first. `output` may be a URL (`s3://...`): it is written to a
    local temporary file, then uploaded. The output is atomic and refuses to replace
    a file unless `force`. Provenance goes into the safetensors metadata
    (`ladle.provenance`) and `<output>.json`. `hash_files`: take each member's
    checksum from the bytes the average reads (no second pass), record it, and
    refuse a member whose bytes differ from the checksum its run recorded
    (`skip_corrupt`: leave it out with a warning).
    """
    options = AverageOptions(dtype=dtype, accumulate=accumulate, int_policy=int_policy, intersect=intersect)
    # Fail on a bad destination before any reading or hashing.
    output_format(output, format)
    final = check_outputs(output, force=force)
    members = open_members(inputs, key=key, strip_prefix=strip_prefix, trust=trust, dedupe=dedupe)
    try:
        return write_average(
            members,
            final,
            weights=weights,
            options=options,
            format=format,
            force=force,
            recipe=recipe,
            verify=hash_files,
            skip_corrupt=skip_corrupt,
            progress=progress,
        )
    finally:
        close_members(members)


__all__ = [
    "AverageResult",
    "average",
    "average_members",
    "average_to_file",
    "check_outputs",
    "resolve_weights",
    "write_average",
]
