"""ladle: crash-safe PyTorch checkpoints; save the whole training state, resume exactly,
keep the right checkpoints, and average them into a better model."""

from ladle._version import __version__
from ladle.errors import (
    CheckpointNotFound,
    ConfigError,
    CorruptCheckpoint,
    LadleError,
    RunLocked,
    StateMismatch,
)
from ladle.store import CheckpointInfo, Run

__all__ = [
    "CheckpointInfo",
    "CheckpointNotFound",
    "ConfigError",
    "CorruptCheckpoint",
    "LadleError",
    "Run",
    "RunLocked",
    "StateMismatch",
    "__version__",
]
