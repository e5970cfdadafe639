"""ladle: crash-safe PyTorch checkpoints; save the whole training state, resume exactly,
keep the right checkpoints, and average them into a better model."""

from ladle._version import __version__
from ladle.average import AverageResult, IntPolicy, average, average_to_file
from ladle.bn import recalibrate_bn
from ladle.diff import Diff, diff_checkpoints
from ladle.ema import EMA, EMAConfig
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
    MissingDependency,
    ModelFactoryError,
    NonFiniteValues,
    OutputExists,
    RunLocked,
    StateMismatch,
    UnsafeLoad,
)
from ladle.export import ExampleInput, ExportResult, export_checkpoint, export_model, export_weights
from ladle.formats import TensorSource, load_source, save_tensors
from ladle.inspection import Inspection, inspect_checkpoint
from ladle.manager import CheckpointManager, ResumePoint
from ladle.retention import Keep, KeepBest, KeepEvery, KeepLast, KeepPinned
from ladle.sampler import ResumableDataLoader, ResumableSampler
from ladle.soup import RunningSoup, SoupResult, soup
from ladle.stopping import EarlyStopping
from ladle.store import CheckpointInfo, Run
from ladle.triggers import EveryEpochs, EverySeconds, EverySteps, OnImprovement, OnThreshold
from ladle.verification import Verification, verify_path

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
    "MissingDependency",
    "ModelFactoryError",
    "NonFiniteValues",
    "OnImprovement",
    "OnThreshold",
    "OutputExists",
    "ResumableDataLoader",
    "ResumableSampler",
    "ResumePoint",
    "Run",
    "RunLocked",
    "RunningSoup",
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
    "recalibrate_bn",
    "save_tensors",
    "soup",
    "verify_path",
]
