"""`SaveRules`: when to save and which checkpoints to keep, validated up front.

The settings `CheckpointManager` and the integration callbacks share (`monitor`,
`mode`, `every_steps`, `every_epochs`, `every_seconds`, `on_improvement`,
`thresholds`, `triggers`, `keep`, `strict_monitor`), checked when they are built so
that a mistake fails before training, not at its first save. Each front door takes
`rules=SaveRules(...)` or the same names as short keywords (`rules_from` merges them;
giving a setting both ways is a ConfigError).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ladle.errors import ConfigError
from ladle.metrics import Mode, parse_mode
from ladle.policies.retention import Keep, Policy
from ladle.policies.triggers import EveryEpochs, EverySeconds, EverySteps, OnImprovement, OnThreshold, Trigger
from ladle.validation import check_bool, check_name, check_numbers, check_optional_int, check_optional_number

KeepLike = Keep | Sequence[Policy] | int | None
"""What `keep=` accepts: `Keep(...)`, a list of policies, an int n (= `Keep(last=n)`), or None (keep all)."""


@dataclass(kw_only=True)
class SaveRules:
    """When a manager or an integration callback saves, and which checkpoints survive.

    Events come from the training loop (`step()`, `epoch_end()`) or the framework:
    a "step" event after each optimizer step, an "epoch" event at each epoch end.
    """

    monitor: str | None = None
    """Metric that defines the best checkpoint (as logged, e.g. "val_loss" or "eval_loss")."""
    mode: Mode | str = Mode.MIN
    """"min" (default, a loss) or "max": which direction of `monitor` is better."""
    every_steps: int | None = None
    """Save every this many optimizer steps."""
    every_epochs: int | None = None
    """Save at the end of every this many epochs."""
    every_seconds: float | None = None
    """Save when this much wall time has passed since the last save."""
    on_improvement: bool = False
    """Save whenever `monitor` beats every earlier value."""
    thresholds: Sequence[float] | None = None
    """Save the first time `monitor` reaches each of these values (falls to them for "min")."""
    triggers: Sequence[Trigger] = ()
    """Further trigger objects (any of them firing saves)."""
    keep: KeepLike = None
    """Retention: `Keep(last=, best=, every=)`, policy objects, an int n (`Keep(last=n)`); None keeps all."""
    strict_monitor: bool = False
    """Raise instead of warning when a save lacks `monitor` after an evaluation reported other metrics."""

    def __post_init__(self) -> None:
        self.mode = parse_mode(self.mode, field="mode")
        check_optional_int("every_steps", self.every_steps, low=1)
        check_optional_int("every_epochs", self.every_epochs, low=1)
        check_optional_number("every_seconds", self.every_seconds, low=0, open_low=True)
        if self.monitor is not None:
            check_name("monitor", self.monitor)
        check_bool("on_improvement", self.on_improvement)
        check_bool("strict_monitor", self.strict_monitor)
        if self.thresholds is not None:
            self.thresholds = check_numbers("thresholds", self.thresholds)
        if (self.on_improvement or self.thresholds) and self.monitor is None:
            raise ConfigError("on_improvement/thresholds need monitor='metric name'")
        if isinstance(self.triggers, Trigger):
            self.triggers = [self.triggers]
        bad = [t for t in self.triggers if not isinstance(t, Trigger)]
        if bad:
            raise ConfigError(
                f"triggers={bad[0]!r} is not allowed; "
                "use ladle trigger objects (EverySteps, OnImprovement, ...)"
            )
        self.keep = _parse_keep(self.keep)
        self.policies()  # fail now, not at the first save, when Keep(best=) lacks a metric

    def build_triggers(self, *, default: Trigger | None) -> list[Trigger]:
        """Fresh trigger objects for these rules; `default` when none is asked for."""
        found: list[Trigger] = []
        if self.every_steps is not None:
            found.append(EverySteps(n=self.every_steps))
        if self.every_epochs is not None:
            found.append(EveryEpochs(n=self.every_epochs))
        if self.every_seconds is not None:
            found.append(EverySeconds(seconds=float(self.every_seconds)))
        if self.monitor is not None and self.on_improvement:
            found.append(OnImprovement(metric=self.monitor, mode=self.mode))
        if self.monitor is not None and self.thresholds:
            found.append(OnThreshold(metric=self.monitor, thresholds=self.thresholds, mode=self.mode))
        found.extend(self.triggers)
        if not found and default is not None:
            found.append(default)
        return found

    def policies(self) -> list[Policy]:
        """The retention policies these rules stand for (empty: keep everything)."""
        if isinstance(self.keep, Keep):
            monitor = (self.monitor, Mode(self.mode)) if self.monitor else None
            return self.keep.policies(monitor)
        return list(self.keep or [])

    @property
    def monitor_spec(self) -> dict[str, str] | None:
        return {"metric": self.monitor, "mode": Mode(self.mode).value} if self.monitor else None


def _parse_keep(keep: Any) -> Keep | list[Policy] | None:
    if keep is None or isinstance(keep, Keep):
        return keep
    if isinstance(keep, int) and not isinstance(keep, bool):
        if keep < 1:
            raise ConfigError(
                f"keep={keep!r} is not allowed; use an integer >= 1 (the newest to keep) or None"
            )
        return Keep(last=keep)
    if isinstance(keep, Sequence) and not isinstance(keep, str | bytes):
        policies = list(keep)
        if all(isinstance(p, Policy) for p in policies):
            return policies
    raise ConfigError(
        f"keep={keep!r} is not allowed; use an int n (the newest n), ladle.Keep(last=, best=, every=), "
        "a list of policies (KeepLast, ...), or None to keep everything"
    )


RULE_NAMES = tuple(f.name for f in dataclasses.fields(SaveRules))


def rules_from(rules: SaveRules | None, given: Mapping[str, Any], *, where: str) -> SaveRules:
    """`rules`, or SaveRules built from the short keywords in `given` (those not None/False/()).

    A front door (`CheckpointManager`, `LadleCheckpoint`, `LadleCallback`) passes the
    keywords the user typed; giving both `rules=` and one of them is ambiguous, so it
    is a ConfigError naming the keyword.
    """
    typed = {k: v for k, v in given.items() if not _unset(v)}
    unknown = sorted(set(typed) - set(RULE_NAMES))
    if unknown:
        raise ConfigError(f"{where}: {unknown[0]!r} is not a save rule; use one of {', '.join(RULE_NAMES)}")
    if rules is None:
        return SaveRules(**typed)
    if not isinstance(rules, SaveRules):
        raise ConfigError(f"{where}: rules={rules!r} is not allowed; use ladle.SaveRules(...)")
    if typed:
        name = sorted(typed)[0]
        raise ConfigError(
            f"{where}: {name}= is given both as a keyword and in rules=SaveRules(...); "
            f"set it in one place (e.g. SaveRules({name}=...))"
        )
    return rules


def _unset(value: Any) -> bool:
    """A keyword left at its default: None, False, or an empty list/tuple."""
    return value is None or value is False or (isinstance(value, list | tuple) and not value)
