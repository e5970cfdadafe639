"""Preemption: SIGTERM (a scheduler's notice) and SIGINT (Ctrl-C) become a final save, then a clean exit.

A signal handler runs between two bytecodes of whatever the training loop is
doing, so it only notes the signal; the manager saves at its next `step()`,
`epoch_end()` or `save()` call, when the state is consistent, logs the saved
checkpoint's name and exits with the shell's code for the signal (130 for
Ctrl-C, 143 for SIGTERM) and no traceback. A second signal gives way at once to
the handler that was there before.
"""

from __future__ import annotations

import logging
import signal
from typing import Any

log = logging.getLogger("ladle")

CAUGHT = (signal.SIGTERM, signal.SIGINT)


class SignalCatcher:
    """Notes SIGTERM/SIGINT while installed; `pending` is the signal awaiting its save."""

    def __init__(self) -> None:
        self.pending: int | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        for signum in CAUGHT:
            self._previous[signum] = signal.signal(signum, self._handle)

    def restore(self) -> None:
        """Put the previous handlers back; idempotent."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def take(self) -> int | None:
        """The pending signal, now handled by the caller's save."""
        signum, self.pending = self.pending, None
        return signum

    def _handle(self, signum: int, frame: Any) -> None:
        if self.pending is not None:
            # A second signal: the user insists, give way to the previous handler.
            previous = self._previous.get(signum)
            if callable(previous):
                previous(signum, frame)
            raise SystemExit(128 + signum)
        self.pending = signum
        log.warning("signal %d: saving at the next step()/epoch_end() call", signum)
