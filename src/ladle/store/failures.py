"""Failed writes as one-line ladle errors: which run, which file, and why.

A full disk or a missing permission surfaces from the libraries that write
checkpoint files in their own words (`OSError`, torch's `RuntimeError:
[enforce fail at inline_container.cc:...]`, safetensors' `SafetensorError:
... IoError(Os { code: 28, ... })`) and names neither the run nor the file.
`writing(run, file)` turns them into `WriteFailed` with the cause spelled out,
keeping the library's error as `__cause__`. Errors that are not failed writes
(a bad argument, an unpicklable object) pass through untouched.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager

from ladle.errors import LadleError, WriteFailed

_OS_CODE = re.compile(r"(?:code: |errno |\[Errno |os error )(\d+)")
# What the user can do about each cause.
_ADVICE = {
    errno.ENOSPC: "free some space",
    errno.EDQUOT: "free some space (disk quota exceeded)",
    errno.EFBIG: "raise the file size limit (ulimit -f) or write elsewhere",
    errno.EACCES: "give this user write permission",
    errno.EPERM: "give this user write permission",
    errno.EROFS: "the file system is mounted read-only; write the run elsewhere",
}


def write_error_code(exc: BaseException) -> int | None:
    """The OS error number behind a failed write, from the error or the libraries' wording."""
    for err in _chain(exc):
        if isinstance(err, OSError) and err.errno:
            return err.errno
        match = _OS_CODE.search(str(err))
        if match:
            return int(match.group(1))
    return None


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _is_write_failure(exc: BaseException) -> bool:
    if isinstance(exc, LadleError):
        return False
    if isinstance(exc, OSError):
        return True
    text = str(exc)
    # torch.save's zip writer and safetensors' Rust writer report I/O failures this way.
    io_words = ("IoError", "I/O error", "os error")
    return (type(exc).__name__ == "SafetensorError" and any(w in text for w in io_words)) or (
        isinstance(exc, RuntimeError) and ("file write failed" in text or "inline_container" in text)
    )


def as_write_failed(exc: BaseException, run: str, file: str) -> WriteFailed | None:
    """A `WriteFailed` for `exc` when it is a failed write of `file` in `run`, else None."""
    if not _is_write_failure(exc):
        return None
    code = write_error_code(exc)
    if code is None:
        # torch's zip writer drops the OS error: a full disk is still recognisable.
        folder = os.path.dirname(file) or "."
        try:
            if shutil.disk_usage(folder if os.path.isdir(folder) else run).free < (1 << 20):
                code = errno.ENOSPC
        except OSError:
            pass
    if code is not None:
        cause = os.strerror(code).lower()
        advice = _ADVICE.get(code, "fix the cause")
    else:
        lines = str(exc).strip().splitlines()
        cause = (lines[0] if lines else type(exc).__name__)[:160]
        advice = "fix the cause"
    error = WriteFailed(
        f"run {run}: cannot write {file} ({cause}); {advice}, then save again "
        "(committed checkpoints are intact)"
    )
    if code is not None:
        error.errno = code
    return error


@contextmanager
def writing(run: str, file: str) -> Iterator[None]:
    """Translate a failed write of `file` in `run` into `WriteFailed` (original as `__cause__`)."""
    try:
        yield
    except BaseException as exc:
        failed = as_write_failed(exc, run, file)
        if failed is None:
            raise
        raise failed from exc
