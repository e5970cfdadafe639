"""Early stopping: decide after each evaluation whether training should end, and say why.

Patience follows PyTorch's `ReduceLROnPlateau`: it is the number of evaluations
*allowed* without improvement; the next one without improvement stops training.
With patience 5 and the best value at epoch 11, training stops at the end of
epoch 17. (Keras' and Lightning's `patience=k` stop one evaluation earlier, like
ladle's `patience=k-1`.)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from ladle.metrics import Mode, is_finite_number, parse_mode
from ladle.validation import (
    check_bool,
    check_int,
    check_name,
    check_number,
    check_optional_number,
    parse_enum,
)


class DeltaMode(str, Enum):
    """How `min_delta` is measured."""

    ABS = "abs"
    REL = "rel"


@dataclass(kw_only=True)
class EarlyStopping:
    """Stop when `metric` stops improving; every option off unless set.

    Call `update(value, epoch=...)` (or let the manager call it at `epoch_end`) and
    read `should_stop` / `reason`. Its state travels with the run's checkpoints.
    """

    metric: str
    """The monitored metric's name in `metrics=`."""
    mode: Mode | str = Mode.MIN
    """"min" or "max": which direction is better."""
    patience: int = 10
    """Evaluations allowed without improvement; the next one stops training."""
    min_delta: float = 0.0
    """Smallest change that counts as an improvement."""
    delta_mode: DeltaMode | str = DeltaMode.ABS
    """"abs": improve by `min_delta`; "rel": by `min_delta` times |best|."""
    warmup: int = 0
    """No stop before this epoch (the counter still runs)."""
    stopping_threshold: float | None = None
    """Stop as soon as the metric is at least this good."""
    divergence_threshold: float | None = None
    """Stop as soon as the metric is worse than this."""
    check_finite: bool = True
    """Stop when the metric is NaN or infinite."""
    restore_best: bool = False
    """When stopping, the manager reloads the best checkpoint's weights."""

    best: float | None = field(default=None, init=False)
    best_epoch: int | None = field(default=None, init=False)
    bad_evaluations: int = field(default=0, init=False)
    stopped_epoch: int | None = field(default=None, init=False)
    reason: str | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        check_name("EarlyStopping.metric", self.metric)
        self.mode = parse_mode(self.mode, field="EarlyStopping.mode")
        self.delta_mode = parse_enum(DeltaMode, self.delta_mode, "EarlyStopping.delta_mode")
        self.patience = check_int("EarlyStopping.patience", self.patience, low=0)
        self.min_delta = check_number("EarlyStopping.min_delta", self.min_delta, low=0)
        self.warmup = check_int("EarlyStopping.warmup", self.warmup, low=0)
        self.stopping_threshold = check_optional_number(
            "EarlyStopping.stopping_threshold", self.stopping_threshold
        )
        self.divergence_threshold = check_optional_number(
            "EarlyStopping.divergence_threshold", self.divergence_threshold
        )
        check_bool("EarlyStopping.check_finite", self.check_finite)
        check_bool("EarlyStopping.restore_best", self.restore_best)

    @property
    def should_stop(self) -> bool:
        return self.reason is not None

    def _improves(self, value: float) -> bool:
        if self.best is None:
            return True
        margin = self.min_delta
        if self.delta_mode is DeltaMode.REL:
            margin = self.min_delta * abs(self.best)
        if self.mode is Mode.MIN:
            return value < self.best - margin
        return value > self.best + margin

    def _better_or_equal(self, value: float, threshold: float) -> bool:
        return value <= threshold if self.mode is Mode.MIN else value >= threshold

    def update(self, value: Any, *, epoch: int) -> bool:
        """Record one evaluation; returns True when training should stop now."""
        if self.should_stop:
            return True
        if not is_finite_number(value):
            if self.check_finite:
                return self._stop(epoch, f"{self.metric} is {value} at epoch {epoch}")
            value = None
        if value is not None:
            value = float(value)
            if self._improves(value):
                self.best, self.best_epoch, self.bad_evaluations = value, epoch, 0
            else:
                self.bad_evaluations += 1
            if self.stopping_threshold is not None and self._better_or_equal(value, self.stopping_threshold):
                return self._stop(
                    epoch,
                    f"{self.metric}={value:g} reached the stopping threshold "
                    f"{self.stopping_threshold:g} at epoch {epoch}",
                )
            if self.divergence_threshold is not None and not self._better_or_equal(
                value, self.divergence_threshold
            ):
                return self._stop(
                    epoch,
                    f"{self.metric}={value:g} is worse than the divergence threshold "
                    f"{self.divergence_threshold:g} at epoch {epoch}",
                )
        else:
            self.bad_evaluations += 1
        if self.bad_evaluations > self.patience and epoch >= self.warmup:
            return self._stop(
                epoch,
                f"{self.metric} did not improve for {self.bad_evaluations} evaluations "
                f"(patience {self.patience}); best {self.best:g} at epoch {self.best_epoch}"
                if self.best is not None
                else f"{self.metric} never had a finite value (patience {self.patience})",
            )
        return False

    def _stop(self, epoch: int, reason: str) -> bool:
        self.stopped_epoch, self.reason = epoch, reason
        return True

    def state_dict(self) -> dict[str, Any]:
        return {
            "best": self.best,
            "best_epoch": self.best_epoch,
            "bad_evaluations": self.bad_evaluations,
            "stopped_epoch": self.stopped_epoch,
            "reason": self.reason,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.best = state.get("best")
        self.best_epoch = state.get("best_epoch")
        self.bad_evaluations = int(state.get("bad_evaluations", 0))
        self.stopped_epoch = state.get("stopped_epoch")
        self.reason = state.get("reason")
