"""Every error ladle raises on purpose.

```
LadleError
├── ConfigError(ValueError)          a setting or argument is invalid
│   └── ModelFactoryError                      `--model module:factory` cannot build a model
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
