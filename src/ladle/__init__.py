"""ladle: crash-safe PyTorch checkpoints; save the whole training state, resume exactly,
keep the right checkpoints, and average them into a better model."""

from ladle._version import __version__
from ladle.average import AverageResult, IntPolicy, average, average_to_file
from ladle.bn import recalibrate_bn
from ladle.ema import EMA, EMAConfig
from ladle.errors import (
    CheckpointNotFound,
    ConfigError,
    CorruptCheckpoint,
    EmptySelection,
    FormatError,
    IncompatibleMembers,
    LadleError,
    NonFiniteValues,
    OutputExists,
    RunLocked,
    StateMismatch,
    UnsafeLoad,
)
from ladle.formats import TensorSource, load_source, save_tensors
from ladle.manager import CheckpointManager, ResumePoint
from ladle.retention import Keep, KeepBest, KeepEvery, KeepLast, KeepPinned
from ladle.sampler import ResumableDataLoader, ResumableSampler
from ladle.soup import RunningSoup, SoupResult, soup
from ladle.stopping import EarlyStopping
from ladle.store import CheckpointInfo, Run
from ladle.triggers import EveryEpochs, EverySeconds, EverySteps, OnImprovement, OnThreshold

__all__ = [
    "EMA",
    "AverageResult",
    "CheckpointInfo",
    "CheckpointManager",
    "CheckpointNotFound",
    "ConfigError",
    "CorruptCheckpoint",
    "EMAConfig",
    "EarlyStopping",
    "EmptySelection",
    "EveryEpochs",
    "EverySeconds",
    "EverySteps",
    "FormatError",
    "IncompatibleMembers",
    "IntPolicy",
    "Keep",
    "KeepBest",
    "KeepEvery",
    "KeepLast",
    "KeepPinned",
    "LadleError",
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
    "__version__",
    "average",
    "average_to_file",
    "load_source",
    "recalibrate_bn",
    "save_tensors",
    "soup",
]
