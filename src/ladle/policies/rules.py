"""`SaveRules`: when to save and which checkpoints to keep, validated up front.

The settings `CheckpointManager` and the integration callbacks share (`monitor`,
`mode`, `every_steps`, `every_epochs`, `every_seconds`, `on_improvement`,
`thresholds`, `triggers`, `keep`), checked when they are built so that a mistake
fails before training, not at its first save.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ladle.errors import ConfigError
from ladle.metrics import Mode, is_finite_number, parse_mode
from ladle.policies.retention import Keep, Policy
from ladle.policies.triggers import EveryEpochs, EverySeconds, EverySteps, OnImprovement, OnThreshold, Trigger


def _positive_int(value: Any, name: str) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ConfigError(f"{name} must be a positive integer or None, got {value!r}")


@dataclass(kw_only=True)
class SaveRules:
    """When a manager or an integration callback saves, and which checkpoints survive.

    Events come from the training loop (`step()`, `epoch_end()`) or the framework:
    a "step" event after each optimizer step, an "epoch" event at each epoch end.
    """

    monitor: str | None = None
    """Metric that defines the best checkpoint (as logged, e.g. "val_loss" or "eval_loss")."""
    mode: Mode | str = Mode.MIN
    """"min" or "max": which direction of `monitor` is better."""
    every_steps: int | None = None
    """Save every this many optimizer steps."""
    every_epochs: int | None = None
    """Save at the end of every this many epochs."""
    every_seconds: float | None = None
    """Save when this much wall time has passed since the last save."""
    on_improvement: bool = False
    """Save whenever `monitor` beats every earlier value."""
    thresholds: Sequence[float] | None = None
    """Save the first time `monitor` reaches each of these values."""
    triggers: Sequence[Trigger] = ()
    """Further trigger objects (any of them firing saves)."""
    keep: Keep | Sequence[Policy] | None = None
    """Retention: `Keep(last=, best=, every=)` or policy objects; None keeps everything."""

    def __post_init__(self) -> None:
        self.mode = parse_mode(self.mode, field="mode")
        _positive_int(self.every_steps, "every_steps")
        _positive_int(self.every_epochs, "every_epochs")
        if self.every_seconds is not None and not (
            is_finite_number(self.every_seconds) and float(self.every_seconds) > 0
        ):
            raise ConfigError(f"every_seconds must be a positive number, got {self.every_seconds!r}")
        if self.monitor is not None and (not isinstance(self.monitor, str) or not self.monitor):
            raise ConfigError(f"monitor must be a metric name, got {self.monitor!r}")
        if (self.on_improvement or self.thresholds) and self.monitor is None:
            raise ConfigError("on_improvement/thresholds need monitor='metric name'")
        bad = [t for t in self.triggers if not isinstance(t, Trigger)]
        if bad:
            raise ConfigError(
                f"triggers must be ladle trigger objects (EverySteps, OnImprovement, ...), got {bad[0]!r}"
            )
        if self.keep is not None and not isinstance(self.keep, Keep):
            policies = list(self.keep)
            if not all(isinstance(p, Policy) for p in policies):
                raise ConfigError("keep must be ladle.Keep(...) or a list of policies (KeepLast, ...)")
            self.keep = policies
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
            direction = Mode.MAX if self.mode is Mode.MAX else Mode.MIN
            found.append(OnThreshold(metric=self.monitor, thresholds=self.thresholds, mode=direction))
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
