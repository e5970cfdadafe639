"""The averaging engine: a streaming, weighted mean over checkpoints, one tensor at a time.

Each key is summed block by block (1 MiB of float32): the block of every member
is read into one small reused buffer (`TensorSource.read_block`, `preadv` from
the file) and added into the accumulator's block while it is in the CPU cache.
The accumulator (float32, or float64) is as large as the largest tensor and
reused across keys; the result goes on to the streaming safetensors writer
(which writes key k in a thread while key k+1 is summed, hence two
accumulators used in turn) or into an in-memory dict. Peak memory is about
three times the largest tensor, whatever the number and size of the
checkpoints. Rules:

- floating tensors accumulate in float32 (float64 on request, and always for
  float64 members) and are written in the members' dtype unless `dtype` says
  otherwise: bf16/fp16 members are averaged in float32 and rounded once;
- integer and bool tensors (BatchNorm `num_batches_tracked`, step counters) are
  never averaged as floats; `IntPolicy` decides;
- tied tensors (one tensor under several names) stay tied;
- members must agree on keys, shapes and dtypes (`intersect=True` averages only
  the common keys); every disagreement is listed in one error;
- a NaN or inf in any member is an error that names the file and key.

Front doors: `average()` returns a state dict; `average_to_file()` writes
safetensors (streaming) or torch format, atomically, with provenance in the
safetensors metadata and a `<output>.json` sidecar.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import torch

from ladle._version import __version__
from ladle.averaging.members import InputLike, Member, close_members, open_members
from ladle.averaging.weights import Weighting, WeightsLike, parse_weights
from ladle.errors import ConfigError, IncompatibleMembers, NonFiniteValues
from ladle.formats import TensorInfo, atomic_path, output_format, save_tensors, sidecar_path
from ladle.formats.source import read_into
from ladle.formats.write import OutputFormat, SafetensorsWriter, check_destination, write_json

log = logging.getLogger("ladle")

PROVENANCE_FORMAT = "ladle-soup/1"
PROVENANCE_KEY = "ladle.provenance"
BLOCK = 1 << 18
"""Elements per block: 1 MiB of float32, so a block of the accumulator and one of
an input stay in the CPU cache while every member is added."""
Progress = Callable[[int], None]
"""Called with a number of bytes just processed, for progress bars."""


class IntPolicy(str, Enum):
    """What an average does with integer and bool tensors, which it never averages as floats."""

    NEWEST = "newest"
    """Copy the newest member's value (highest step; the last listed when steps are unknown)."""
    FIRST = "first"
    """Copy the first member's value."""
    FLOOR_MEAN = "floor-mean"
    """Floor of the (weighted) mean, as fairseq does: [7,8,9] and [2,2,2] give [4,5,5]."""
    ERROR = "error"
    """Refuse when members disagree on any integer tensor."""


_DTYPE_NAMES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "f32": torch.float32,
    "float": torch.float32,
    "float64": torch.float64,
    "fp64": torch.float64,
    "f64": torch.float64,
    "double": torch.float64,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "f16": torch.float16,
    "half": torch.float16,
}


def parse_dtype(value: str | torch.dtype | None, *, field: str = "dtype") -> torch.dtype | None:
    """A floating torch dtype from a name such as "bf16" or "float32" (None stays None)."""
    if value is None or isinstance(value, torch.dtype):
        if isinstance(value, torch.dtype) and not value.is_floating_point:
            raise ConfigError(f"{field}={value} is not a floating dtype; use float32, bf16, fp16 or float64")
        return value
    key = str(value).lower().removeprefix("torch.")
    if key in ("", "same", "auto", "members"):
        return None
    if key not in _DTYPE_NAMES:
        raise ConfigError(f"{field}={value!r} is not known; use float32, bfloat16, float16 or float64")
    return _DTYPE_NAMES[key]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass(kw_only=True)
class AverageOptions:
    """How to average: accumulator and output dtypes, integer policy, key handling."""

    dtype: torch.dtype | None = None
    """Output dtype of floating tensors; None keeps each member's dtype."""
    accumulate: torch.dtype = torch.float32
    """Accumulator dtype: float32 (default) or float64."""
    int_policy: IntPolicy = IntPolicy.NEWEST
    """What to do with integer and bool tensors."""
    intersect: bool = False
    """Average only the keys every member has, instead of refusing a mismatch."""
    check_finite: bool = True
    """Refuse members holding NaN or inf (one check per key on the sum)."""

    def __post_init__(self) -> None:
        self.dtype = parse_dtype(self.dtype, field="dtype")
        accumulate = parse_dtype(self.accumulate, field="accumulate")
        if accumulate not in (torch.float32, torch.float64):
            raise ConfigError(f"accumulate={self.accumulate!r} must be float32 or float64")
        self.accumulate = accumulate
        try:
            self.int_policy = IntPolicy(self.int_policy)
        except ValueError:
            allowed = ", ".join(p.value for p in IntPolicy)
            raise ConfigError(f"int_policy={self.int_policy!r} is not known; use one of {allowed}") from None


class Kind(str, Enum):
    FLOAT = "float"
    INT = "int"


@dataclass(frozen=True)
class KeyPlan:
    """What happens to one key: its layout, how it is combined, and its output dtype."""

    key: str
    info: TensorInfo
    kind: Kind
    out_dtype: torch.dtype
    acc_dtype: torch.dtype | None


@dataclass(kw_only=True)
class Plan:
    """Validated layout of an average: every key's fate, the ties, the newest member."""

    keys: dict[str, KeyPlan]
    """Stored keys in output order (aliases excluded)."""
    ties: dict[str, str]
    """Aliases kept tied in the output: {alias: stored key}."""
    order: list[str]
    """Every output key (stored and alias) in the first member's order."""
    newest: int
    """Index of the newest member (for IntPolicy.NEWEST)."""
    batchnorm_layers: int = 0
    dropped: list[str] = field(default_factory=list)

    @property
    def layout(self) -> dict[str, TensorInfo]:
        out = {}
        for key in self.order:
            stored = self.ties.get(key, key)
            plan = self.keys[stored]
            out[key] = TensorInfo(plan.info.shape, plan.out_dtype)
        return out

    @property
    def total_bytes(self) -> int:
        return sum(p.info.nbytes for p in self.keys.values())


def _is_float(dtype: torch.dtype) -> bool:
    return dtype.is_floating_point or dtype.is_complex


def _few(items: Sequence[str], n: int = 4) -> str:
    shown = ", ".join(repr(i) for i in items[:n])
    return shown + (f" and {len(items) - n} more" if len(items) > n else "")


def _prefix_hint(reference: list[str], other: list[str]) -> str:
    for ref_keys, oth_keys in ((reference, other), (other, reference)):
        for prefix in ("module.", "_orig_mod.", "model."):
            stripped = {k.removeprefix(prefix) for k in oth_keys}
            if all(k.startswith(prefix) for k in oth_keys) and stripped == set(ref_keys):
                return (
                    f"; the keys differ by the prefix {prefix!r}: pass strip_prefix (--strip-prefix {prefix})"
                )
    return ""


def build_plan(members: Sequence[Member], options: AverageOptions) -> Plan:
    """Check the members agree and decide every key's fate, reading no tensor data."""
    if not members:
        raise ConfigError("nothing to average: no members")
    first = members[0]
    first_keys = first.source.keys()
    key_sets = [set(m.source.keys()) for m in members]
    common = set.intersection(*key_sets)
    problems: list[str] = []
    if not options.intersect:
        for member, keys in zip(members[1:], key_sets[1:], strict=True):
            missing = [k for k in first_keys if k not in keys]
            extra = [k for k in member.source if k not in key_sets[0]]
            if missing or extra:
                parts = []
                if missing:
                    parts.append(f"lacks {_few(missing)}")
                if extra:
                    parts.append(f"has extra {_few(extra)}")
                hint = _prefix_hint(first_keys, member.source.keys())
                problems.append(f"{member.label} {' and '.join(parts)}{hint}")
        if problems:
            raise IncompatibleMembers(
                f"members disagree on keys (compared with {first.label}): {'; '.join(problems)}; "
                f"pass intersect=True (--intersect) to average only the {len(common)} common keys"
            )
    order = [k for k in first_keys if k in common]
    if not order:
        raise IncompatibleMembers(
            f"members share no keys (first: {first.label}); check --key and --strip-prefix"
        )
    dropped = sorted(set().union(*key_sets) - common)
    if dropped:
        log.warning("averaging the %d common keys; leaving out %s", len(order), _few(dropped))

    # Ties kept: those every member declares (otherwise each name is averaged on its own).
    tie_maps = [m.source.ties() for m in members]
    ties = {
        alias: target
        for alias, target in tie_maps[0].items()
        if alias in common and target in common and all(t.get(alias) == target for t in tie_maps[1:])
    }
    for alias, target in tie_maps[0].items():
        if alias in common and alias not in ties:
            log.warning("%r is tied to %r in some members only; averaging the two separately", alias, target)

    keys: dict[str, KeyPlan] = {}
    for key in order:
        if key in ties:
            continue
        infos = [m.source.info(key) for m in members]
        ref = infos[0]
        for member, info in zip(members[1:], infos[1:], strict=True):
            if tuple(info.shape) != tuple(ref.shape):
                problems.append(
                    f"{key!r} is {list(ref.shape)} in {first.label} but {list(info.shape)} in {member.label}"
                )
            elif info.dtype != ref.dtype:
                mixed_floats = _is_float(info.dtype) and _is_float(ref.dtype) and options.dtype is not None
                if not mixed_floats:
                    problems.append(
                        f"{key!r} is {dtype_name(ref.dtype)} in {first.label} but "
                        f"{dtype_name(info.dtype)} in {member.label}"
                    )
        if _is_float(ref.dtype):
            complex_ = ref.dtype.is_complex
            wide = options.accumulate == torch.float64 or any(i.dtype == torch.float64 for i in infos)
            if complex_:
                acc = torch.complex128 if wide else torch.complex64
                out = ref.dtype
            else:
                acc = torch.float64 if wide else torch.float32
                out = options.dtype or ref.dtype
            keys[key] = KeyPlan(key, ref, Kind.FLOAT, out, acc)
        else:
            keys[key] = KeyPlan(key, ref, Kind.INT, ref.dtype, None)
    if problems:
        more = f" (and {len(problems) - 6} more)" if len(problems) > 6 else ""
        raise IncompatibleMembers(
            f"members disagree: {'; '.join(problems[:6])}{more}; average checkpoints of one model"
            + (" or pass dtype= (--dtype) to average mixed float dtypes" if "float" in str(problems) else "")
        )

    steps = [m.step for m in members]
    if all(s is not None for s in steps):
        newest = max(range(len(members)), key=lambda i: (steps[i], i))  # type: ignore[arg-type, return-value]
    else:
        newest = len(members) - 1
    bn = sum(1 for k in order if k.rsplit(".", 1)[-1] == "running_mean")
    return Plan(keys=keys, ties=ties, order=order, newest=newest, batchnorm_layers=bn, dropped=dropped)


def resolve_weights(members: Sequence[Member], weights: WeightsLike) -> tuple[Weighting, list[float]]:
    weighting = parse_weights(weights)
    return weighting, weighting(members)


class Averager:
    """Streams the weighted average of `members`, key by key, following a `Plan`."""

    def __init__(
        self,
        members: Sequence[Member],
        weights: Sequence[float],
        plan: Plan,
        options: AverageOptions,
        *,
        uniform: bool = False,
        progress: Progress | None = None,
    ) -> None:
        if len(weights) != len(members):
            raise ConfigError(f"{len(weights)} weights for {len(members)} members")
        self.members = list(members)
        self.weights = [float(w) for w in weights]
        self.plan = plan
        self.options = options
        # Uniform weights: sum, then divide once (what fairseq does; exact for small integers).
        self.uniform = uniform or len(set(self.weights)) == 1
        self.progress = progress
        # Blocks of the inputs are read here: small enough to stay in the CPU cache.
        widest = max((p.info.dtype.itemsize for p in plan.keys.values()), default=1)
        self._scratch = torch.empty(BLOCK * widest, dtype=torch.uint8)
        acc_bytes = max(
            (p.info.numel * p.acc_dtype.itemsize for p in plan.keys.values() if p.acc_dtype is not None),
            default=8,
        )
        out_bytes = max(
            (
                p.info.numel * p.out_dtype.itemsize
                for p in plan.keys.values()
                if p.acc_dtype is not None and p.out_dtype != p.acc_dtype
            ),
            default=8,
        )
        # Two of each, used in turn, so a writer thread can still be writing the
        # previous key while the next one is computed. Untouched pages of
        # torch.empty cost no memory, so buffers that are never used cost nothing.
        self._accs = [torch.empty(max(acc_bytes, 8), dtype=torch.uint8) for _ in range(2)]
        self._outs = [torch.empty(max(out_bytes, 8), dtype=torch.uint8) for _ in range(2)]
        self._turn = 0

    @property
    def _acc(self) -> torch.Tensor:
        return self._accs[self._turn]

    @property
    def _out(self) -> torch.Tensor:
        return self._outs[self._turn]

    def _owns(self, tensor: torch.Tensor) -> bool:
        ptr = tensor.untyped_storage().data_ptr()
        buffers = (*self._accs, *self._outs, self._scratch)
        return ptr in {b.untyped_storage().data_ptr() for b in buffers}

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        return self.stream(list(self.plan.keys))

    def stream(self, order: Sequence[str], *, copy: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
        """(key, averaged tensor) for every stored key in `order`.

        Without `copy`, a yielded tensor may live in a buffer that is reused two
        keys later: finish with it (write it) before asking for the key after next.
        """
        # The work comes in cache-sized blocks, far too small for torch's thread
        # pool to pay off: its barriers only add waiting (badly so on a busy
        # machine). One thread computes while another writes the output.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            for key in order:
                plan = self.plan.keys[key]
                if plan.kind is Kind.FLOAT:
                    out = self._float(plan)
                else:
                    out = self._int(plan)
                if copy and self._owns(out):
                    out = out.clone()
                yield key, out
        finally:
            torch.set_num_threads(threads)

    def _read(self, index: int, key: str) -> torch.Tensor:
        member = self.members[index]
        tensor = read_into(member.source, key, self._scratch)
        if self.progress is not None:
            self.progress(tensor.numel() * tensor.element_size())
        return tensor

    def _float(self, plan: KeyPlan) -> torch.Tensor:
        """Average one floating key, block by block.

        Each block of the accumulator stays in the CPU cache while every member's
        matching block is read into it, scaled, checked and cast, so each input
        byte crosses memory once and the accumulator is written once.
        """
        key, acc_dtype = plan.key, plan.acc_dtype
        assert acc_dtype is not None
        numel = plan.info.numel
        self._turn ^= 1
        acc = self._acc[: numel * acc_dtype.itemsize].view(acc_dtype)
        narrow = plan.out_dtype != acc_dtype
        out = self._out[: numel * plan.out_dtype.itemsize].view(plan.out_dtype) if narrow else acc
        check = self.options.check_finite
        finite = True
        n = len(self.members)
        for start in range(0, numel, BLOCK):
            count = min(BLOCK, numel - start)
            block = acc[start : start + count]
            for i, member in enumerate(self.members):
                x = member.source.read_block(key, start, count, self._scratch)
                weight = self.weights[i]
                if i == 0:
                    if self.uniform:
                        block.copy_(x)
                    elif x.dtype == acc_dtype:
                        torch.mul(x, weight, out=block)
                    else:
                        # Widen first: a bf16 product would be rounded before it is stored.
                        block.copy_(x)
                        block.mul_(weight)
                elif self.uniform:
                    block.add_(x)
                else:
                    block.add_(x, alpha=weight)
                del x
                member.source.release_block(key, start, count)
                if self.progress is not None:
                    self.progress(count * plan.info.dtype.itemsize)
            if self.uniform:
                block.div_(n)
            # One reduction while the block is in cache: the sum is finite when every
            # value is (a NaN or inf in any member reaches the accumulator).
            if check and finite and not math.isfinite(abs(complex(block.sum().item()))):
                finite = bool(torch.isfinite(block).all())
            if narrow:
                cast = out[start : start + count]
                cast.copy_(block)
                if check and finite and cast.dtype.is_floating_point and not bool(torch.isfinite(cast).all()):
                    raise NonFiniteValues(
                        f"{key!r}: the average overflows {dtype_name(cast.dtype)}; "
                        "write a wider dtype (--dtype float32)"
                    )
        for member in self.members:
            member.source.release(key)
        if not finite:
            self._explain_non_finite(key)
        return out.view(plan.info.shape)

    def _explain_non_finite(self, key: str) -> None:
        for i, member in enumerate(self.members):
            tensor = read_into(member.source, key, self._scratch)
            bad = ~torch.isfinite(tensor)
            if bool(bad.any()):
                count = int(bad.sum())
                kind = "NaN" if bool(torch.isnan(tensor).any()) else "inf"
                raise NonFiniteValues(
                    f"{member.label}: {key!r} holds {count} non-finite value(s) ({kind}); "
                    "leave this checkpoint out of the average"
                )
            del tensor
            self.members[i].source.release(key)
        raise NonFiniteValues(
            f"{key!r}: the weighted sum overflows; accumulate in float64 (accumulate='float64', "
            "--accumulate float64)"
        )

    def _int(self, plan: KeyPlan) -> torch.Tensor:
        key = plan.key
        policy = self.options.int_policy
        if policy is IntPolicy.NEWEST or policy is IntPolicy.FIRST:
            index = self.plan.newest if policy is IntPolicy.NEWEST else 0
            out = self._read(index, key).clone()
            self.members[index].source.release(key)
            return out
        if policy is IntPolicy.ERROR:
            reference = self._read(0, key).clone()
            for i in range(1, len(self.members)):
                tensor = self._read(i, key)
                if not torch.equal(tensor, reference):
                    raise IncompatibleMembers(
                        f"{key!r}: integer values differ between {self.members[0].label} and "
                        f"{self.members[i].label}; choose another int_policy "
                        "(--int-policy newest|first|floor-mean)"
                    )
                self.members[i].source.release(key)
            return reference
        # floor-mean
        if self.uniform:
            total = torch.zeros(plan.info.shape, dtype=torch.int64)
            for i in range(len(self.members)):
                total.add_(self._read(i, key).to(torch.int64))
                self.members[i].source.release(key)
            mean = torch.div(total, len(self.members), rounding_mode="floor")
        else:
            total64 = torch.zeros(plan.info.shape, dtype=torch.float64)
            for i, weight in enumerate(self.weights):
                total64.add_(self._read(i, key).to(torch.float64), alpha=weight)
                self.members[i].source.release(key)
            # Weights that sum to one in exact arithmetic may land a hair under an integer.
            nearest = torch.round(total64)
            close = (total64 - nearest).abs() <= 1e-9 * nearest.abs().clamp(min=1.0)
            mean = torch.where(close, nearest, torch.floor(total64)).to(torch.int64)
        if plan.info.dtype == torch.bool:
            return mean.to(torch.bool)
        return mean.to(plan.info.dtype)


# -- front doors -----------------------------------------------------------------------------------


def _options(
    dtype: str | torch.dtype | None,
    accumulate: str | torch.dtype,
    int_policy: IntPolicy | str,
    intersect: bool,
) -> AverageOptions:
    return AverageOptions(
        dtype=dtype,  # type: ignore[arg-type]
        accumulate=accumulate,  # type: ignore[arg-type]
        int_policy=int_policy,  # type: ignore[arg-type]
        intersect=intersect,
    )


def warn_batchnorm(plan: Plan) -> None:
    """Log that averaged BatchNorm statistics need recalibrating, when the members have them."""
    if plan.batchnorm_layers:
        log.warning(
            "the members hold BatchNorm running statistics (%d layers); averaged statistics do not "
            "match averaged weights: recalibrate with ladle.recalibrate_bn(model, loader)",
            plan.batchnorm_layers,
        )


def average_members(
    members: Sequence[Member],
    *,
    weights: WeightsLike = "uniform",
    options: AverageOptions | None = None,
    progress: Progress | None = None,
) -> tuple[dict[str, torch.Tensor], Plan, list[float]]:
    """The average of already-open members as a state dict (ties shared), its plan and weights."""
    options = options or AverageOptions()
    weighting, normalized = resolve_weights(members, weights)
    plan = build_plan(members, options)
    warn_batchnorm(plan)
    averager = Averager(members, normalized, plan, options, uniform=weighting.uniform, progress=progress)
    stored = dict(averager.stream(list(plan.keys), copy=True))
    state = {k: stored[plan.ties.get(k, k)] for k in plan.order}
    return state, plan, normalized


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
    progress: Progress | None = None,
) -> dict[str, torch.Tensor]:
    """The weighted average of checkpoints, as a state dict in memory.

    `inputs`: paths, globs, folders, runs (`RUN` or `RUN@REF`), state dicts or
    open `TensorSource`s. `weights`: "uniform", numbers, "softmax:METRIC:min|max[:T]"
    or "recency:HALF_LIFE". Use `average_to_file` to average checkpoints larger
    than memory.
    """
    options = _options(dtype, accumulate, int_policy, intersect)
    members = open_members(inputs, key=key, strip_prefix=strip_prefix, trust=trust, dedupe=dedupe)
    try:
        state, _, _ = average_members(members, weights=weights, options=options, progress=progress)
    finally:
        close_members(members)
    return state


@dataclass(kw_only=True)
class AverageResult:
    """What `average_to_file` wrote and how."""

    path: str
    """The output file."""
    sidecar: str
    """The provenance JSON beside it."""
    provenance: dict[str, Any]
    """Recipe, members (path, step, sha256, weight), dtypes and policies, ladle version."""

    @property
    def weights(self) -> list[float]:
        return [m["weight"] for m in self.provenance["members"]]


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
    """The record written beside every average."""
    return {
        "format": PROVENANCE_FORMAT,
        "ladle_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "recipe": recipe,
        "weighting": weighting,
        "members": [m.record(w) for m, w in zip(members, weights, strict=True)],
        "dtype": dtype_name(options.dtype) if options.dtype else "as members",
        "accumulate": dtype_name(options.accumulate),
        "int_policy": options.int_policy.value,
        "intersect": options.intersect,
        "keys": len(plan.order),
        "dropped_keys": plan.dropped,
        "tied": dict(plan.ties),
        "batchnorm_layers": plan.batchnorm_layers,
        **dict(extra or {}),
    }


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
    progress: Progress | None = None,
) -> AverageResult:
    """Average open members into `output` (see `average_to_file`)."""
    options = options or AverageOptions()
    chosen = output_format(output, format)
    final = check_destination(output, force=force)
    side = sidecar_path(final)
    if sidecar:
        check_destination(side, force=force)
    weighting, normalized = resolve_weights(members, weights)
    plan = build_plan(members, options)
    warn_batchnorm(plan)
    record = provenance(
        members, normalized, plan, options, recipe=recipe, weighting=str(weighting), extra=extra
    )
    averager = Averager(members, normalized, plan, options, uniform=weighting.uniform, progress=progress)
    if chosen is OutputFormat.SAFETENSORS:
        metadata = {"format": "pt", PROVENANCE_KEY: json.dumps(record, default=str)}
        with atomic_path(final, force=force) as tmp:
            writer = SafetensorsWriter(tmp, plan.layout, metadata=metadata, ties=plan.ties)
            try:
                _write_overlapped(writer, averager)
                writer.finish()
            finally:
                writer.close()
    else:
        stored = dict(averager.stream(list(plan.keys), copy=True))
        state = {k: stored[plan.ties.get(k, k)] for k in plan.order}
        save_tensors(state, final, format=OutputFormat.TORCH, force=force)
    if sidecar:
        write_json(side, record, force=True)
    log.info("wrote the average of %d checkpoints to %s", len(members), final)
    return AverageResult(path=final, sidecar=side if sidecar else "", provenance=record)


def _write_overlapped(writer: SafetensorsWriter, averager: Averager) -> None:
    """Write key k in a thread while key k+1 is computed (the averager alternates buffers)."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="ladle-write") as pool:
        pending: Future[None] | None = None
        try:
            for key, tensor in averager.stream(writer.order):
                if pending is not None:
                    pending.result()
                pending = pool.submit(writer.write, key, tensor)
            if pending is not None:
                pending.result()
        except BaseException:
            if pending is not None:
                pending.cancel()
                try:
                    pending.result()
                except BaseException:  # the first error is the one to report
                    pass
            raise


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
    format: OutputFormat | str | None = None,
    force: bool = False,
    recipe: str | None = None,
    progress: Progress | None = None,
) -> AverageResult:
    """Average checkpoints into `output`, streaming: memory stays at about one tensor per member.

    safetensors output (the default, or a `.safetensors` name) is written as the
    average is computed; torch format (`format="torch"` or a `.pt` name) is
    built in memory first. The output is atomic and refuses to replace a file
    unless `force`. Provenance goes into the safetensors metadata
    (`ladle.provenance`) and `<output>.json`; `hash_files` computes the sha256
    of members whose checksum is not already recorded by a run.
    """
    options = _options(dtype, accumulate, int_policy, intersect)
    # Fail on a bad destination before any reading or hashing.
    output_format(output, format)
    final = check_destination(output, force=force)
    check_destination(sidecar_path(final), force=force)
    members = open_members(
        inputs, key=key, strip_prefix=strip_prefix, trust=trust, dedupe=dedupe, hash_files=hash_files
    )
    try:
        return write_average(
            members,
            final,
            weights=weights,
            options=options,
            format=format,
            force=force,
            recipe=recipe,
            progress=progress,
        )
    finally:
        close_members(members)


def read_provenance(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The provenance recorded in a safetensors output (or its sidecar), if any."""
    from ladle.formats.safetensors_io import read_header

    text = os.fspath(path)
    side = sidecar_path(text)
    if text.endswith(".safetensors"):
        _, _, metadata = read_header(text)
        if PROVENANCE_KEY in metadata:
            return dict(json.loads(metadata[PROVENANCE_KEY]))
    if os.path.isfile(side):
        with open(side, encoding="utf-8") as handle:
            return dict(json.load(handle))
    return None


class RunningAverage:
    """A uniform average kept in memory that grows one member at a time (greedy soups).

    Holds the running sum of every floating tensor in the accumulator dtype
    (one model) and the integer tensors of the members added so far, so trying
    a candidate costs reading that candidate once: never the other members.
    """

    def __init__(self, plan: Plan, options: AverageOptions) -> None:
        self.plan = plan
        self.options = options
        self.count = 0
        self._sums: dict[str, torch.Tensor] = {}
        self._ints: dict[str, list[tuple[tuple[int, int], torch.Tensor]]] = {}

    @staticmethod
    def load(member: Member, plan: Plan) -> dict[str, torch.Tensor]:
        """A member's stored tensors, read once (owned copies, not file mappings)."""
        out = {}
        for key in plan.keys:
            out[key] = member.source.tensor(key).clone()
            member.source.release(key)
        return out

    def state(
        self, candidate: Mapping[str, torch.Tensor] | None = None, rank: tuple[int, int] = (0, 0)
    ) -> dict[str, torch.Tensor]:
        """The average of the members added so far, plus `candidate` if given."""
        n = self.count + (candidate is not None)
        if n == 0:
            raise ConfigError("the running average is empty; add a member first")
        stored: dict[str, torch.Tensor] = {}
        for key, plan in self.plan.keys.items():
            if plan.kind is Kind.FLOAT:
                total = self._sums.get(key)
                if candidate is not None:
                    extra = candidate[key].to(plan.acc_dtype)
                    total = extra if total is None else total + extra
                assert total is not None
                stored[key] = (total / n).to(plan.out_dtype)
            else:
                entries = list(self._ints.get(key, []))
                if candidate is not None:
                    entries.append((rank, candidate[key]))
                stored[key] = self._combine_ints(key, entries, plan)
        return {k: stored[self.plan.ties.get(k, k)] for k in self.plan.order}

    def add(self, tensors: Mapping[str, torch.Tensor], rank: tuple[int, int]) -> None:
        """Add a member (its tensors from `load`); `rank` orders members for the int policy."""
        for key, plan in self.plan.keys.items():
            if plan.kind is Kind.FLOAT:
                value = tensors[key].to(plan.acc_dtype)
                if key in self._sums:
                    self._sums[key].add_(value)
                else:
                    self._sums[key] = value.clone() if value.data_ptr() == tensors[key].data_ptr() else value
            else:
                self._ints.setdefault(key, []).append((rank, tensors[key]))
        self.count += 1

    def _combine_ints(
        self, key: str, entries: list[tuple[tuple[int, int], torch.Tensor]], plan: KeyPlan
    ) -> torch.Tensor:
        policy = self.options.int_policy
        ordered = sorted(entries, key=lambda e: e[0])
        if policy is IntPolicy.NEWEST:
            return ordered[-1][1].clone()
        if policy is IntPolicy.FIRST:
            return ordered[0][1].clone()
        if policy is IntPolicy.ERROR:
            for _, value in ordered[1:]:
                if not torch.equal(value, ordered[0][1]):
                    raise IncompatibleMembers(
                        f"{key!r}: integer values differ between members; choose another int_policy"
                    )
            return ordered[0][1].clone()
        total = torch.zeros(plan.info.shape, dtype=torch.int64)
        for _, value in ordered:
            total.add_(value.to(torch.int64))
        mean = torch.div(total, len(ordered), rounding_mode="floor")
        return mean.to(plan.info.dtype)
