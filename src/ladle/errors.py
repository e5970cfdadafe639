"""Every error ladle raises on purpose.

```
LadleError
├── ConfigError(ValueError)          a setting or argument is invalid
│   └── ModelFactoryError                      `--model module:factory` cannot build a model
├── RunError
│   ├── RunNotFound(FileNotFoundError)         no run at that path
│   ├── NotARunDirectory(NotADirectoryError)   the run path is a file or not a run
│   ├── RunLocked(RuntimeError)                another writer holds the run
│   ├── ManagerClosed(RuntimeError)            a closed manager was used
│   ├── BackgroundSaveError(RuntimeError)      an asynchronous save failed (raised at the next call)
│   ├── ShardedSaveError(RuntimeError)         a rank failed in a sharded save; nothing was committed
│   └── WriteFailed(OSError)                   a file of the run cannot be written (disk full, permission)
├── StorageError(OSError)                    a store is unreachable, its bucket missing, or access denied
├── CheckpointNotFound(FileNotFoundError)      no checkpoint by that name/step
├── CorruptCheckpoint(ValueError)              checksum, size or parse failure
├── StateMismatch(ValueError)                  saved state does not fit the live objects
├── FormatError(ValueError)                    a file ladle cannot read as asked
│   └── UnsafeLoad                             reading it would execute code (needs trust=True)
├── IncompatibleMembers(ValueError)            checkpoints to average disagree
│   └── NonFiniteValues                        a member holds NaN or inf
├── OutputExists(FileExistsError)              an output is there already (pass force)
├── EmptySelection(ValueError)                 a recipe selected no checkpoints
├── ExportMismatch(RuntimeError)               an exported model disagrees with eager PyTorch
├── ExportFailed(RuntimeError)                 the exporter (TorchScript/ONNX) failed on the model
└── MissingDependency(ImportError)             an optional extra is not installed
```

Every message is one line: what is wrong, where (file, key), and what to do.
Leaves also subclass the matching built-in, so callers may catch either.
"""

from __future__ import annotations

import re


class LadleError(Exception):
    """Base class of every error ladle raises on purpose."""


class ConfigError(LadleError, ValueError):
    """A setting or argument is invalid."""


class RunError(LadleError):
    """Something is wrong with a run directory as a whole."""


class RunNotFound(RunError, FileNotFoundError):
    """No run exists at the given path."""


class NotARunDirectory(RunError, NotADirectoryError):
    """The run path exists but is not a directory ladle can use."""


class BackgroundSaveError(RunError, RuntimeError):
    """A save that ran in the background failed; raised, naming it, at the next call into the manager."""


class ShardedSaveError(RunError, RuntimeError):
    """A sharded save failed on some rank; nothing was committed."""


class RunLocked(RunError, RuntimeError):
    """Another live writer holds the run's lock."""


class ManagerClosed(RunError, RuntimeError):
    """A closed CheckpointManager was used."""


class WriteFailed(RunError, OSError):
    """A file of the run could not be written (no space left, permission denied, read-only).

    The message names the run, the file and the cause; the original error is `__cause__`.
    """


class StorageError(LadleError, OSError):
    """A store (s3://, gs://, ...) cannot be reached, its bucket is missing, or it refuses access.

    The message names the URL and what to check (network, endpoint, credentials).
    """


class CheckpointNotFound(LadleError, FileNotFoundError):
    """No checkpoint matches the requested name, step or path."""


class CorruptCheckpoint(LadleError, ValueError):
    """A checkpoint's files fail their checksum, size or parse."""


class StateMismatch(LadleError, ValueError):
    """Saved state does not fit the live objects (keys, shapes, names)."""


class FormatError(LadleError, ValueError):
    """A file cannot be read in the way that was asked."""


class UnsafeLoad(FormatError):
    """Reading the file would execute code from it; pass trust=True (--trust) to allow."""


class IncompatibleMembers(LadleError, ValueError):
    """Checkpoints to be averaged disagree on keys, shapes or dtypes."""


class ExportMismatch(LadleError, RuntimeError):
    """An exported model's output differs from eager PyTorch beyond the tolerance."""


class NonFiniteValues(IncompatibleMembers):
    """A member to be averaged holds NaN or inf in some tensor."""


class OutputExists(LadleError, FileExistsError):
    """The output path exists already; pass force=True (--force) to replace it."""


class EmptySelection(LadleError, ValueError):
    """A soup recipe (with its window) selected no checkpoints."""


class ExportFailed(LadleError, RuntimeError):
    """The exporter (TorchScript trace, ONNX) failed on the model, or the export cannot run."""


class ModelFactoryError(ConfigError):
    """A `module:factory` model spec cannot be imported, called, or does not build a model."""


class MissingDependency(LadleError, ImportError):
    """An optional extra (e.g. `ladle[onnx]`) is needed and not installed."""


def first_line(exc: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message (its type name when empty), for one-line errors
    that quote a library's or the user's exception."""
    # Terminal escape codes (torch bolds part of its weights-only message) never reach ours.
    lines = _ANSI_ESCAPE.sub("", str(exc)).strip().splitlines()
    return (lines[0].strip() if lines else type(exc).__name__)[:limit]


_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
