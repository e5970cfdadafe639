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
    "AverageResult": "ladle.averaging.front_doors",
    "IntPolicy": "ladle.averaging.int_policies",
    "average": "ladle.averaging.front_doors",
    "average_to_file": "ladle.averaging.front_doors",
    "read_provenance": "ladle.averaging.provenance",
    "recalibrate_bn": "ladle.averaging.bn",
    "EMA": "ladle.averaging.ema",
    "EMAConfig": "ladle.averaging.ema_config",
    "RunningSoup": "ladle.averaging.running_soup",
    "SoupResult": "ladle.averaging.soups",
    "soup": "ladle.averaging.soups",
    "BackgroundSaveError": "ladle.errors",
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
    "ShardedSaveError": "ladle.errors",
    "StateMismatch": "ladle.errors",
    "StorageError": "ladle.errors",
    "UnsafeLoad": "ladle.errors",
    "WriteFailed": "ladle.errors",
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
    "ResumePoint": "ladle.saving.resume",
    "load_weights": "ladle.state.load_weights",
    "ResumableDataLoader": "ladle.state.sampler",
    "ResumableSampler": "ladle.state.sampler",
    "CheckpointInfo": "ladle.store.checkpoint",
    "Run": "ladle.store.run",
    "Verification": "ladle.store.verification",
    "verify_path": "ladle.store.verification",
    "Diff": "ladle.tools.diff",
    "diff_checkpoints": "ladle.tools.diff",
    "ExampleInput": "ladle.tools.export_spec",
    "ExportResult": "ladle.tools.export_spec",
    "export_checkpoint": "ladle.tools.export",
    "export_model": "ladle.tools.export_model",
    "export_weights": "ladle.tools.export_weights",
    "Inspection": "ladle.tools.inspection",
    "inspect_checkpoint": "ladle.tools.inspection",
}

__all__ = [
    "EMA",
    "AverageResult",
    "BackgroundSaveError",
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
    "ShardedSaveError",
    "SoupResult",
    "StateMismatch",
    "StorageError",
    "TensorSource",
    "UnsafeLoad",
    "Verification",
    "WriteFailed",
    "__version__",
    "average",
    "average_to_file",
    "diff_checkpoints",
    "export_checkpoint",
    "export_model",
    "export_weights",
    "inspect_checkpoint",
    "load_source",
    "load_weights",
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
    from ladle.averaging.ema import EMA
    from ladle.averaging.ema_config import EMAConfig
    from ladle.averaging.front_doors import AverageResult, average, average_to_file
    from ladle.averaging.int_policies import IntPolicy
    from ladle.averaging.provenance import read_provenance
    from ladle.averaging.running_soup import RunningSoup
    from ladle.averaging.soups import SoupResult, soup
    from ladle.errors import (
        BackgroundSaveError,
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
        ShardedSaveError,
        StateMismatch,
        StorageError,
        UnsafeLoad,
        WriteFailed,
    )
    from ladle.formats import TensorSource, load_source, save_tensors
    from ladle.policies.retention import Keep, KeepBest, KeepEvery, KeepLast, KeepPinned
    from ladle.policies.rules import SaveRules
    from ladle.policies.stopping import EarlyStopping
    from ladle.policies.triggers import EveryEpochs, EverySeconds, EverySteps, OnImprovement, OnThreshold
    from ladle.saving.manager import CheckpointManager
    from ladle.saving.resume import ResumePoint
    from ladle.state.load_weights import load_weights
    from ladle.state.sampler import ResumableDataLoader, ResumableSampler
    from ladle.store.checkpoint import CheckpointInfo
    from ladle.store.run import Run
    from ladle.store.verification import Verification, verify_path
    from ladle.tools.diff import Diff, diff_checkpoints
    from ladle.tools.export import export_checkpoint
    from ladle.tools.export_model import export_model
    from ladle.tools.export_spec import ExampleInput, ExportResult
    from ladle.tools.export_weights import export_weights
    from ladle.tools.inspection import Inspection, inspect_checkpoint
