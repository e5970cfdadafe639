"""ladle: crash-safe PyTorch checkpoints; save the whole training state, resume exactly,
keep the right checkpoints, and average them into a better model.

Public names are imported on first use (PEP 562), so `import ladle` and the CLI's
light commands (`ladle --help`, `ladle ls`) do not pay for importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ladle._version import __version__

# Public name -> the module that defines it.
_EXPORTS: dict[str, str] = {
    "AverageResult": "ladle.averaging.engine",
    "IntPolicy": "ladle.averaging.engine",
    "average": "ladle.averaging.engine",
    "average_to_file": "ladle.averaging.engine",
    "read_provenance": "ladle.averaging.engine",
    "recalibrate_bn": "ladle.averaging.bn",
    "EMA": "ladle.averaging.ema",
    "EMAConfig": "ladle.averaging.ema",
    "RunningSoup": "ladle.averaging.soups",
    "SoupResult": "ladle.averaging.soups",
    "soup": "ladle.averaging.soups",
    "CheckpointNotFound": "ladle.errors",
    "ConfigError": "ladle.errors",
    "CorruptCheckpoint": "ladle.errors",
    "EmptySelection": "ladle.errors",
    "ExportFailed": "ladle.errors",
    "ExportMismatch": "ladle.errors",
    "FormatError": "ladle.errors",
    "IncompatibleMembers": "ladle.errors",
    "LadleError": "ladle.errors",
    "ManagerClosed": "ladle.errors",
    "MissingDependency": "ladle.errors",
    "ModelFactoryError": "ladle.errors",
    "NonFiniteValues": "ladle.errors",
    "NotARunDirectory": "ladle.errors",
    "OutputExists": "ladle.errors",
    "RunError": "ladle.errors",
    "RunLocked": "ladle.errors",
    "RunNotFound": "ladle.errors",
    "StateMismatch": "ladle.errors",
    "UnsafeLoad": "ladle.errors",
    "TensorSource": "ladle.formats",
    "load_source": "ladle.formats",
    "save_tensors": "ladle.formats",
    "EarlyStopping": "ladle.policies.stopping",
    "Keep": "ladle.policies.retention",
    "KeepBest": "ladle.policies.retention",
    "KeepEvery": "ladle.policies.retention",
    "KeepLast": "ladle.policies.retention",
    "KeepPinned": "ladle.policies.retention",
    "SaveRules": "ladle.policies.rules",
    "EveryEpochs": "ladle.policies.triggers",
    "EverySeconds": "ladle.policies.triggers",
    "EverySteps": "ladle.policies.triggers",
    "OnImprovement": "ladle.policies.triggers",
    "OnThreshold": "ladle.policies.triggers",
    "CheckpointManager": "ladle.saving.manager",
    "ResumePoint": "ladle.saving.manager",
    "ResumableDataLoader": "ladle.state.sampler",
    "ResumableSampler": "ladle.state.sampler",
    "CheckpointInfo": "ladle.store.run",
    "Run": "ladle.store.run",
    "Verification": "ladle.store.verification",
    "verify_path": "ladle.store.verification",
    "Diff": "ladle.tools.diff",
    "diff_checkpoints": "ladle.tools.diff",
    "ExampleInput": "ladle.tools.export",
    "ExportResult": "ladle.tools.export",
    "export_checkpoint": "ladle.tools.export",
    "export_model": "ladle.tools.export",
    "export_weights": "ladle.tools.export",
    "Inspection": "ladle.tools.inspection",
    "inspect_checkpoint": "ladle.tools.inspection",
}

__all__ = [
    "EMA",
    "AverageResult",
    "CheckpointInfo",
    "CheckpointManager",
    "CheckpointNotFound",
    "ConfigError",
    "CorruptCheckpoint",
    "Diff",
    "EMAConfig",
    "EarlyStopping",
    "EmptySelection",
    "EveryEpochs",
    "EverySeconds",
    "EverySteps",
    "ExampleInput",
    "ExportFailed",
    "ExportMismatch",
    "ExportResult",
    "FormatError",
    "IncompatibleMembers",
    "Inspection",
    "IntPolicy",
    "Keep",
    "KeepBest",
    "KeepEvery",
    "KeepLast",
    "KeepPinned",
    "LadleError",
    "ManagerClosed",
    "MissingDependency",
    "ModelFactoryError",
    "NonFiniteValues",
    "NotARunDirectory",
    "OnImprovement",
    "OnThreshold",
    "OutputExists",
    "ResumableDataLoader",
    "ResumableSampler",
    "ResumePoint",
    "Run",
    "RunError",
    "RunLocked",
    "RunNotFound",
    "RunningSoup",
    "SaveRules",
    "SoupResult",
    "StateMismatch",
    "TensorSource",
    "UnsafeLoad",
    "Verification",
    "__version__",
    "average",
    "average_to_file",
    "diff_checkpoints",
    "export_checkpoint",
    "export_model",
    "export_weights",
    "inspect_checkpoint",
    "load_source",
    "read_provenance",
    "recalibrate_bn",
    "save_tensors",
    "soup",
    "verify_path",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'ladle' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return list(__all__)


if TYPE_CHECKING:  # static checkers and IDEs see the real names
    from ladle.averaging.bn import recalibrate_bn
    from ladle.averaging.ema import EMA, EMAConfig
    from ladle.averaging.engine import AverageResult, IntPolicy, average, average_to_file, read_provenance
    from ladle.averaging.soups import RunningSoup, SoupResult, soup
    from ladle.errors import (
        CheckpointNotFound,
        ConfigError,
        CorruptCheckpoint,
        EmptySelection,
        ExportFailed,
        ExportMismatch,
        FormatError,
        IncompatibleMembers,
        LadleError,
        ManagerClosed,
        MissingDependency,
        ModelFactoryError,
        NonFiniteValues,
        NotARunDirectory,
        OutputExists,
        RunError,
        RunLocked,
        RunNotFound,
        StateMismatch,
        UnsafeLoad,
    )
    from ladle.formats import TensorSource, load_source, save_tensors
    from ladle.policies.retention import Keep, KeepBest, KeepEvery, KeepLast, KeepPinned
    from ladle.policies.rules import SaveRules
    from ladle.policies.stopping import EarlyStopping
    from ladle.policies.triggers import EveryEpochs, EverySeconds, EverySteps, OnImprovement, OnThreshold
    from ladle.saving.manager import CheckpointManager, ResumePoint
    from ladle.state.sampler import ResumableDataLoader, ResumableSampler
    from ladle.store.run import CheckpointInfo, Run
    from ladle.store.verification import Verification, verify_path
    from ladle.tools.diff import Diff, diff_checkpoints
    from ladle.tools.export import ExampleInput, ExportResult, export_checkpoint, export_model, export_weights
    from ladle.tools.inspection import Inspection, inspect_checkpoint
