"""The plan of an average: members checked against each other, every key's fate decided.

`build_plan` reads no tensor data: keys, shapes and dtypes of every member are
compared (every disagreement listed in one error that names the files), tied
names are kept tied when every member ties them, and each key is given its
accumulator and output dtype, or marked integer (an `IntPolicy` decides).
`AverageOptions` holds the choices, validated at construction.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum

import torch

from ladle.averaging.int_policies import IntPolicy
from ladle.averaging.members import Member
from ladle.errors import ConfigError, IncompatibleMembers
from ladle.formats.dtypes import dtype_name, parse_float_dtype
from ladle.formats.source import TensorInfo

log = logging.getLogger("ladle")


@dataclass(kw_only=True)
class AverageOptions:
    """How to average: accumulator and output dtypes, integer policy, key handling.

    Fields accept what users write ("bf16", torch.bfloat16, "floor-mean") and
    are normalized at construction; read them through `output_dtype`,
    `accumulator` and `policy`.
    """

    dtype: str | torch.dtype | None = None
    """Output dtype of floating tensors; None (or "same") keeps each member's dtype."""
    accumulate: str | torch.dtype = torch.float32
    """Accumulator dtype: float32 (default) or float64."""
    int_policy: IntPolicy | str = IntPolicy.NEWEST
    """What to do with integer and bool tensors."""
    intersect: bool = False
    """Average only the keys every member has, instead of refusing a mismatch."""
    check_finite: bool = True
    """Refuse members holding NaN or inf (one check per block on the sum)."""

    def __post_init__(self) -> None:
        self.dtype = parse_float_dtype(self.dtype, field="dtype")
        accumulate = parse_float_dtype(self.accumulate, field="accumulate")
        if accumulate not in (torch.float32, torch.float64):
            raise ConfigError(f"accumulate={self.accumulate!r} must be float32 or float64")
        self.accumulate = accumulate
        try:
            self.int_policy = IntPolicy(self.int_policy)
        except ValueError:
            allowed = ", ".join(p.value for p in IntPolicy)
            raise ConfigError(f"int_policy={self.int_policy!r} is not known; use one of {allowed}") from None
        for name in ("intersect", "check_finite"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name}={getattr(self, name)!r} must be True or False")

    @property
    def output_dtype(self) -> torch.dtype | None:
        """The floating output dtype, or None to keep each member's."""
        assert self.dtype is None or isinstance(self.dtype, torch.dtype)  # normalized in __post_init__
        return self.dtype

    @property
    def accumulator(self) -> torch.dtype:
        """float32 or float64."""
        assert isinstance(self.accumulate, torch.dtype)  # normalized in __post_init__
        return self.accumulate

    @property
    def policy(self) -> IntPolicy:
        """The integer policy."""
        return IntPolicy(self.int_policy)


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
    mixed_floats = False  # members store one key in two float dtypes: --dtype would resolve it
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
                both_float = _is_float(info.dtype) and _is_float(ref.dtype)
                if not (both_float and options.output_dtype is not None):
                    mixed_floats = mixed_floats or both_float
                    problems.append(
                        f"{key!r} is {dtype_name(ref.dtype)} in {first.label} but "
                        f"{dtype_name(info.dtype)} in {member.label}"
                    )
        if _is_float(ref.dtype):
            complex_ = ref.dtype.is_complex
            wide = options.accumulator == torch.float64 or any(i.dtype == torch.float64 for i in infos)
            if complex_:
                acc = torch.complex128 if wide else torch.complex64
                out = ref.dtype
            else:
                acc = torch.float64 if wide else torch.float32
                out = options.output_dtype or ref.dtype
            keys[key] = KeyPlan(key, ref, Kind.FLOAT, out, acc)
        else:
            keys[key] = KeyPlan(key, ref, Kind.INT, ref.dtype, None)
    if problems:
        more = f" (and {len(problems) - 6} more)" if len(problems) > 6 else ""
        raise IncompatibleMembers(
            f"members disagree: {'; '.join(problems[:6])}{more}; average checkpoints of one model"
            + (" or pass dtype= (--dtype) to average mixed float dtypes" if mixed_floats else "")
        )

    steps = [m.step for m in members]
    known = [s for s in steps if s is not None]
    if len(known) == len(steps):
        newest = max(range(len(members)), key=lambda i: (known[i], i))
    else:
        newest = len(members) - 1
    bn = sum(1 for k in order if k.rsplit(".", 1)[-1] == "running_mean")
    return Plan(keys=keys, ties=ties, order=order, newest=newest, batchnorm_layers=bn, dropped=dropped)


def warn_batchnorm(plan: Plan, members: int = 2) -> None:
    """Log that averaged BatchNorm statistics need recalibrating, when the members have them."""
    if plan.batchnorm_layers and members > 1:  # one member keeps its own statistics
        log.warning(
            "the members hold BatchNorm running statistics (%d layers); averaged statistics do not "
            "match averaged weights: recalibrate with ladle.recalibrate_bn(model, loader)",
            plan.batchnorm_layers,
        )


__all__ = ["AverageOptions", "KeyPlan", "Kind", "Plan", "build_plan", "warn_batchnorm"]
