"""Every error ladle raises on purpose.

```
LadleError
├── ConfigError(ValueError)          a setting or argument is invalid
├── RunError
│   ├── RunNotFound(FileNotFoundError)         no run at that path
│   ├── NotARunDirectory(NotADirectoryError)   the run path is a file or not a run
│   ├── RunLocked(RuntimeError)                another writer holds the run
│   └── ManagerClosed(RuntimeError)            a closed manager was used
├── CheckpointNotFound(FileNotFoundError)      no checkpoint by that name/step
├── CorruptCheckpoint(ValueError)              checksum, size or parse failure
├── StateMismatch(ValueError)                  saved state does not fit the live objects
├── FormatError(ValueError)                    a file ladle cannot read as asked
│   └── UnsafeLoad                             reading it would execute code (needs trust=True)
├── IncompatibleMembers(ValueError)            checkpoints to average disagree
└── ExportMismatch(RuntimeError)               an exported model disagrees with eager PyTorch
```

Every message is one line: what is wrong, where (file, key), and what to do.
Leaves also subclass the matching built-in, so callers may catch either.
"""

from __future__ import annotations


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


class RunLocked(RunError, RuntimeError):
    """Another live writer holds the run's lock."""


class ManagerClosed(RunError, RuntimeError):
    """A closed CheckpointManager was used."""


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
