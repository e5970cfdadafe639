"""Asynchronous saves: the loop blocks only while the state is copied into host memory.

`stage(obj)` copies every tensor of a nested state (dicts, lists, tuples) into
host memory: into pinned buffers for CUDA tensors (the copy runs on the
device's copy engine and is awaited once), a plain copy for CPU tensors. The
copies are what gets written, so training may change the parameters as soon as
`save()` returns: the committed checkpoint holds the state at the call.

`BackgroundSaver` is the save engine's one background thread
(`SaveEngine.save(request, background=True)`): it runs the write, fsync, commit
and retention of one save. At most one save is in flight: the next one waits for
the previous commit. An error in the background is kept and raised, naming the
checkpoint, by the next `check()` (the manager calls it from `step`, `save`,
`epoch_end` and `close`; the integrations at their next save and at the end of
training); it is never swallowed. `wait()` (and `close()`) blocks until the
commit is done.

The CUDA paths (pinned staging, the device synchronisation) have not run on a
GPU in this project's tests; the CPU paths have.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from typing import Any, TypeVar

import torch

from ladle.errors import BackgroundSaveError

log = logging.getLogger("ladle")

T = TypeVar("T")


def stage(obj: T) -> T:
    """A copy of `obj` whose tensors live in host memory and share nothing with the live state.

    Tensors shared by several entries (tied weights) stay shared in the copy.
    """
    return HostStager().stage(obj)


class HostStager:
    """Copies nested state into host memory, reusing its buffers from one save to the next.

    Fresh memory costs a page fault per page on first touch (and pinning costs more),
    which made a copy several times slower than the copy itself; a buffer of the same
    place, shape and dtype as last time is reused instead. Reuse is safe because at most
    one save is in flight: the caller stages only after the previous write is done.
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple[Any, ...], torch.Tensor] = {}

    def session(self) -> Callable[[Any], Any]:
        """A `stage` for one save whose calls get buffers of their own, by call order."""
        calls = itertools.count()
        return lambda obj: self.stage(obj, f"#{next(calls)}")

    def stage(self, obj: T, key: str = "") -> T:
        """`obj` with every tensor copied into host memory (`key` names this object's buffers)."""
        copies: dict[int, torch.Tensor] = {}
        devices: set[torch.device] = set()
        staged = self._stage(obj, (key,), copies, devices)
        for device in devices:
            torch.cuda.synchronize(device)  # the non-blocking copies into pinned memory are done
        return staged

    def _stage(
        self, obj: Any, where: tuple[Any, ...], copies: dict[int, torch.Tensor], devices: set[torch.device]
    ) -> Any:
        if isinstance(obj, torch.Tensor):
            found = copies.get(id(obj))
            if found is None:
                found = copies[id(obj)] = self._host_copy(obj, where, devices)
            return found
        if isinstance(obj, dict):
            return {k: self._stage(v, (*where, k), copies, devices) for k, v in obj.items()}
        if isinstance(obj, list):
            return [self._stage(v, (*where, i), copies, devices) for i, v in enumerate(obj)]
        if isinstance(obj, tuple) and not hasattr(obj, "_fields"):
            return tuple(self._stage(v, (*where, i), copies, devices) for i, v in enumerate(obj))
        return obj

    def _host_copy(
        self, tensor: torch.Tensor, where: tuple[Any, ...], devices: set[torch.device]
    ) -> torch.Tensor:
        tensor = tensor.detach()
        if tensor.device.type == "meta":
            return tensor
        if type(tensor) is not torch.Tensor:  # a DTensor or another subclass: its own copy
            return tensor.to("cpu", copy=True)
        cuda = tensor.device.type == "cuda"
        slot = (where, tensor.shape, tensor.dtype, tensor.stride(), cuda)
        buffer = self._buffers.get(slot)
        if buffer is None:
            buffer = torch.empty_strided(
                tensor.shape, tensor.stride(), dtype=tensor.dtype, device="cpu", pin_memory=cuda
            )
            self._buffers[slot] = buffer
        buffer.copy_(tensor, non_blocking=cuda)
        if cuda:
            devices.add(tensor.device)
        return buffer


class BackgroundSaver:
    """Runs one save at a time on a background thread; errors surface at the next `check()`."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ladle-async-save")
        self._future: Future[Any] | None = None
        self._name: str | None = None

    @property
    def in_flight(self) -> bool:
        future = self._future
        return future is not None and not future.done()

    def submit(self, name: str, save: Callable[[], T]) -> Future[T]:
        """Run `save()` in the background once the previous save has committed."""
        self.wait()
        self._name = name
        self._future = self._pool.submit(save)
        return self._future

    def check(self) -> None:
        """Raise the error of a finished background save (once), naming its checkpoint."""
        future = self._future
        if future is None or not future.done():
            return
        self._future = None
        exc = future.exception()
        if exc is not None:
            log.error("background save of %s failed: %s", self._name, exc)
            text = str(exc).splitlines()[0][:200] if str(exc) else ""
            raise BackgroundSaveError(
                f"the background save of checkpoint {self._name} failed ({type(exc).__name__}: {text}); "
                "it was not committed"
            ) from exc

    def wait(self) -> None:
        """Block until the save in flight (if any) has committed; raise its error."""
        future = self._future
        if future is not None:
            futures_wait([future])
        self.check()

    def close(self) -> None:
        """Wait for the save in flight, then stop the thread; raises a background error."""
        try:
            self.wait()
        finally:
            self._pool.shutdown(wait=True)
