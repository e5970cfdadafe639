"""CheckpointManager: the complete training state of a run, saved by triggers and resumed exactly.

The front door of ladle for a training loop:

    with ladle.CheckpointManager("runs/exp1", model=model, optimizer=opt, scheduler=sched,
                                 monitor="val_loss", mode="min", keep=ladle.Keep(last=3, best=2)) as mgr:
        start = mgr.resume()                      # None for a fresh run
        ...
        mgr.step(step, metrics={"loss": loss})    # saves when a trigger fires
        mgr.epoch_end(epoch, metrics={"val_loss": v})

What is the manager's own: the registry of objects to checkpoint, the training
loop's calls, the files it stages from the objects at each save (`ladle.saving.payload`:
`state.pt`, one safetensors file per model, the EMA) and its lifecycle. When to save,
the commit (in the background too), superseding, retention and metric recording
belong to the one save engine (`ladle.saving.engine.SaveEngine`), which the
integrations use too; resuming is `ladle.saving.resume`.

The module is longer than most (about 560 lines) because it is the front door: its
constructor's keywords, properties and loop calls are the API users read, and each
mechanism behind them lives in its own module (engine, payload, resume, sharded,
async_save, preemption).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

from torch import nn

from ladle.errors import ConfigError, ManagerClosed
from ladle.metrics import Mode
from ladle.policies.retention import Keep, Policy
from ladle.policies.rules import SaveRules, rules_from
from ladle.policies.stopping import EarlyStopping
from ladle.policies.triggers import EveryEpochs, Trigger
from ladle.saving.async_save import HostStager
from ladle.saving.engine import FileWriter, SaveEngine, SaveRequest
from ladle.saving.payload import build_payload, check_object, checkpoint_files
from ladle.saving.preemption import SignalCatcher
from ladle.saving.resume import ResumePoint, resume
from ladle.saving.sharded import (
    ShardedCheckpointer,
    broadcast_from_rank0,
    checkpoint_group,
    distributed,
    holds_sharded_tensors,
    is_sharded_checkpoint,
)
from ladle.state.model_weights import load_model_weights
from ladle.state.readers import EMA_NAME, read_ema_weights, read_model_weights
from ladle.store.checkpoint import CheckpointInfo
from ladle.store.history import HistoryLog
from ladle.store.layout import checkpoint_name
from ladle.store.run import Run
from ladle.store.storage import storage_for
from ladle.validation import check_int, check_name

log = logging.getLogger("ladle")


class CheckpointManager:
    """Saves and restores the complete training state of a run; one writer per run.

    Pass the objects to checkpoint by name (`model=`, `optimizer=`, `scheduler=`,
    `scaler=`, `ema=`, `early_stopping=`, `data=`, or any `state={name: obj}`):
    anything with `state_dict()`/`load_state_dict()` joins; `nn.Module`s are saved
    as safetensors weights. When to save and what to keep: `rules=SaveRules(...)`,
    or the same settings as short keywords (`monitor=`, `every_steps=`, `keep=` ...;
    not both). With no trigger, every epoch end saves. `clock` is the time source of
    `every_seconds` (tests pass a fake one).

    Models holding DTensors (FSDP2, tensor parallel) are saved sharded through
    `torch.distributed.checkpoint`, every rank writing its part (`sharded=True`
    forces it; `ladle.saving.sharded`). `async_save=True` copies the state into host
    memory and commits in the background (`ladle.saving.async_save`; `wait()`).

    `storage_options` are the fsspec file system's options (endpoint, credentials,
    ...) of a run on an object store (`s3://bucket/runs/exp1`), passed to `ladle.Run`;
    fsspec's config files and the backend's environment (`AWS_*`) work too.
    """

    def __init__(
        self,
        run_dir: str,
        *,
        model: nn.Module | None = None,
        optimizer: Any = None,
        scheduler: Any = None,
        scaler: Any = None,
        ema: Any = None,
        early_stopping: EarlyStopping | None = None,
        data: Any = None,
        state: Mapping[str, Any] | None = None,
        rules: SaveRules | None = None,
        monitor: str | None = None,
        mode: Mode | str | None = None,
        every_steps: int | None = None,
        every_epochs: int | None = None,
        every_seconds: float | None = None,
        on_improvement: bool = False,
        thresholds: Sequence[float] | None = None,
        triggers: Sequence[Trigger] = (),
        keep: Keep | Sequence[Policy] | int | None = None,
        config: Mapping[str, Any] | None = None,
        save_on_signal: bool = False,
        exit_after_signal_save: bool = True,
        running_soup: Any = None,
        clock: Callable[[], float] = time.monotonic,
        sharded: bool | None = None,
        async_save: bool = False,
        storage_options: Mapping[str, Any] | None = None,
    ) -> None:
        if not isinstance(run_dir, str):
            run_dir = _fspath(run_dir)
        check_name("run_dir", run_dir, what="a run directory path")
        self.objects: dict[str, Any] = {}
        named = {
            "model": model,
            "optimizer": optimizer,
            "scheduler": scheduler,
            "scaler": scaler,
            EMA_NAME: ema,
            "early_stopping": early_stopping,
            "data": data,
        }
        for name, obj in [*named.items(), *(state or {}).items()]:
            if obj is not None:
                self._register(name, obj)
        self.ema = ema
        self.early_stopping = early_stopping
        given = dict(
            monitor=monitor,
            mode=mode,
            every_steps=every_steps,
            every_epochs=every_epochs,
            every_seconds=every_seconds,
            on_improvement=on_improvement,
            thresholds=thresholds,
            triggers=triggers,
            keep=keep,
        )
        if rules is None and monitor is None and early_stopping is not None:
            # Early stopping's metric is the best one unless another is named.
            given.update(monitor=early_stopping.metric, mode=mode or early_stopping.mode)
        rules = rules_from(rules, given, where="CheckpointManager")
        if rules.monitor is None and early_stopping is not None:
            rules = replace(rules, monitor=early_stopping.metric, mode=early_stopping.mode)
        self.rules = rules
        if config is not None:
            try:
                json.dumps(config, allow_nan=False)
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"config must be JSON-serializable ({exc}); pass plain values") from None
        self.config = dict(config) if config is not None else None
        self.extras: dict[str, Any] = {}
        self.global_step = 0
        self.epoch = 0
        self.epoch_complete = False
        self.running_soup = running_soup
        self._closed = False
        self._signals = SignalCatcher()
        self._exit_after_signal_save = exit_after_signal_save
        # Models holding DTensors (FSDP2, tensor parallel) are saved by every rank through DCP.
        detected = any(holds_sharded_tensors(m) for m in self._models().values())
        self.sharded = detected if sharded is None else bool(sharded)
        if self.sharded and not storage_for(run_dir, storage_options)[0].atomic_rename:
            # Every rank writes its DCP files into a folder that rank 0 commits by renaming it;
            # a store has no rename, and DCP's own writers do not write a store's commit marker.
            raise ConfigError(
                f"{run_dir}: sharded checkpoints (DTensor / FSDP2 models, sharded=True) are saved on a "
                "local or shared file system only, not on an object store; give the run a path on a "
                "file system every rank can write"
            )
        # In a torch.distributed job every rank builds a manager and resumes; only rank 0
        # writes (the model is replicated under DDP), so the others take no lock.
        self.is_writer = _rank() == 0
        self.run = (
            Run(run_dir, create=True, storage_options=storage_options)
            if self.is_writer
            else _wait_for_run(run_dir, storage_options)
        )
        if self.is_writer:
            self.run.acquire()
        self._history = HistoryLog(self.run, write=self.is_writer)
        self.engine = SaveEngine(
            self.run.path,
            rules,
            default_trigger=EveryEpochs(n=1),
            run=self.run,
            history=self._history,
            clock=clock,
        )
        # Asynchronous saves stage the state in host memory and commit on a background thread.
        self.async_save = bool(async_save)
        self._stager = HostStager()  # its buffers are reused from one background save to the next
        # A sharded background save runs its collectives on a group of its own.
        self._save_group = checkpoint_group() if self.sharded and self.async_save else None
        if save_on_signal:
            self._signals.install()

    def _register(self, name: str, obj: Any) -> None:
        check_object(name, obj, self.objects)
        self.objects[name] = obj

    def _models(self) -> dict[str, nn.Module]:
        return {n: o for n, o in self.objects.items() if isinstance(o, nn.Module)}

    # -- lifecycle ---------------------------------------------------------------------

    def __enter__(self) -> CheckpointManager:
        self._check_open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Release the run's writer lock and signal handlers; idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            self.engine.wait()  # the commit in flight; raises its error
        finally:
            self._signals.restore()
            try:
                self._history.close()
            finally:
                self.engine.close()  # stops the background thread
                self.run.release()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def _check_open(self) -> None:
        if self._closed:
            raise ManagerClosed(
                f"{self.run.path}: this CheckpointManager is closed; create a new one to keep saving"
            )

    # -- properties --------------------------------------------------------------------

    @property
    def monitor(self) -> str | None:
        return self.rules.monitor

    @property
    def mode(self) -> Mode:
        return Mode(self.rules.mode)

    @property
    def triggers(self) -> list[Trigger]:
        return self.engine.triggers

    @property
    def policies(self) -> list[Policy]:
        return self.rules.policies()

    @property
    def resumed_from(self) -> str | None:
        """The checkpoint of this run that the manager resumed from (never deleted by retention)."""
        return self.engine.resumed_from

    @property
    def monitor_spec(self) -> dict[str, str] | None:
        return self.rules.monitor_spec

    @property
    def latest(self) -> CheckpointInfo | None:
        return self.run.latest()

    @property
    def best(self) -> CheckpointInfo | None:
        return self.run.best(self.monitor, self.mode) if self.monitor else None

    @property
    def history(self) -> list[dict[str, Any]]:
        """Every metric reported in this run's lineage: `{kind, step, epoch, time, metrics}`."""
        return self._history.entries

    @property
    def should_stop(self) -> bool:
        """True once early stopping has decided to stop, or a signal arrived and its save is pending."""
        es = self.early_stopping
        return bool(es is not None and es.should_stop) or self._signals.pending is not None

    @property
    def stop_reason(self) -> str | None:
        if self._signals.pending is not None:
            return f"signal {self._signals.pending}: the final save happens at the next step()/epoch_end()"
        return self.early_stopping.reason if self.early_stopping is not None else None

    @property
    def preempted(self) -> bool:
        """True when a signal arrived and the final save is pending."""
        return self._signals.pending is not None

    # -- the training loop's calls -------------------------------------------------------

    def step(
        self, step: int, *, metrics: Mapping[str, Any] | None = None, epoch: int | None = None
    ) -> CheckpointInfo | None:
        """Call once per optimizer step with the number of steps completed; saves if a trigger fires."""
        self._check_open()
        self._check_background()
        self._advance(check_int("step", step, low=0), epoch, complete=False)
        values = self.engine.report("step", self.global_step, self.epoch, metrics, where="step(metrics)")
        reason = self._agreed(self.engine.poll("step", self.global_step, self.epoch, values))
        return self._after_event(self._save(reason) if reason else None)

    def epoch_end(
        self, epoch: int, *, metrics: Mapping[str, Any] | None = None, step: int | None = None
    ) -> CheckpointInfo | None:
        """Call at the end of each epoch (0-based); updates early stopping, saves if a trigger fires."""
        self._check_open()
        self._check_background()
        self._advance(step, check_int("epoch", epoch, low=0), complete=True)
        values = self.engine.report(
            "epoch", self.global_step, self.epoch, metrics, where="epoch_end(metrics)"
        )
        es = self.early_stopping
        stopped_now = False
        if es is not None and not es.should_stop and es.metric in values:
            stopped_now = es.update(values[es.metric], epoch=self.epoch)
        if es is not None and distributed():
            # Rank 0's decision and counters on every rank: the ranks must stop together (a
            # DDP rank that stopped alone leaves the others waiting in their next all-reduce),
            # and in a sharded job restoring the best checkpoint is a collective DCP read.
            stopped_now, state = broadcast_from_rank0((stopped_now, es.state_dict()))
            es.load_state_dict(state)
        reason = self.engine.poll("epoch", self.global_step, self.epoch, values)
        if stopped_now:
            reason = reason or f"early stopping: {es.reason if es else ''}"
        reason = self._agreed(reason)
        saved = self._save(reason) if reason else None
        if stopped_now and es is not None:
            log.info("early stopping: %s", es.reason)
            if es.restore_best:
                self.restore_best()
        return self._after_event(saved)

    def _advance(self, step: int | None, epoch: int | None, *, complete: bool) -> None:
        if step is not None:
            self.global_step = check_int("step", step, low=0)
        if epoch is not None:
            self.epoch = check_int("epoch", epoch, low=0)
        self.epoch_complete = complete

    def _after_event(self, saved: CheckpointInfo | None) -> CheckpointInfo | None:
        if self._signals.pending is None:
            return saved
        signum = self._signals.pending
        saved = saved or self._save(f"signal {signum}", asynchronous=False)
        self._signals.take()
        exiting = "; exiting" if self._exit_after_signal_save else ""
        log.warning("saved %s after signal %d%s", saved.name, signum, exiting)
        if self._exit_after_signal_save:
            self.close()
            raise SystemExit(128 + signum)  # 130 for Ctrl-C, as a shell reports it; no traceback
        return saved

    # -- saving ------------------------------------------------------------------------

    def save(
        self,
        step: int | None = None,
        epoch: int | None = None,
        metrics: Mapping[str, Any] | None = None,
        *,
        pin: bool = False,
        async_save: bool | None = None,
    ) -> CheckpointInfo | None:
        """Save the complete state now, as a new checkpoint, then apply retention.

        With `async_save` (default: the manager's), the state is copied into host
        memory and written and committed in the background: None is returned, and
        `wait()` (or `close()`) returns once it is committed.

        On ranks other than 0 of a distributed job nothing is written and the newest
        checkpoint known to this process is returned.
        """
        self._check_open()
        self._check_background()
        self._advance(step, epoch, complete=self.epoch_complete)
        if metrics is not None:
            self.engine.report(
                "save", self.global_step, self.epoch, metrics, where="save(metrics)", history=False
            )
        return self._save("save()", pin=pin, force=pin, asynchronous=async_save)

    def _agreed(self, reason: str | None) -> str | None:
        """Rank 0's decision on every rank of a sharded job: a save is collective, all ranks join."""
        return broadcast_from_rank0(reason) if self.sharded and distributed() else reason

    def _check_background(self) -> None:
        self.engine.check()

    def wait(self) -> None:
        """Block until the asynchronous save in flight (if any) is committed; raise its error."""
        self.engine.wait()

    def _save(
        self, trigger: str, *, pin: bool = False, force: bool = False, asynchronous: bool | None = None
    ) -> CheckpointInfo:
        background = bool(self.async_save if asynchronous is None else asynchronous)
        if background and self.sharded and self._save_group is None and distributed():
            log.warning("a sharded save runs in the background only with CheckpointManager(async_save=True)")
            background = False
        self.wait()  # at most one save in flight, and saves commit in order
        if not self.is_writer and not self.sharded:
            self.run.refresh()
            return self.run.latest()  # type: ignore[return-value]
        metrics = self.engine.metrics_at(self.global_step)
        engine = self.engine
        if not force and engine.already_saved(self.global_step, metrics, epoch_complete=self.epoch_complete):
            return engine.last_saved  # type: ignore[return-value]  # the same state was just saved
        save: Callable[..., CheckpointInfo | None] = engine.save
        if self.sharded:
            checkpointer = self._checkpointer(group=self._save_group if background else None)
            save = functools.partial(
                engine.save_sharded,
                sharded=checkpointer,
                per_rank=self._stager.stage(ShardedCheckpointer.own_rank_state(self.objects), "rank"),
                # Each rank's shards, copied into host memory now: the state at the call.
                state=self._stager.stage(checkpointer.state(), "dcp") if background else None,
            )
        request = SaveRequest(
            name=self.run.free_name(checkpoint_name(self.global_step)),
            files=self._stage(host_copy=background),
            step=self.global_step,
            epoch=self.epoch,
            metrics=metrics,
            trigger=trigger,
            pinned=pin,
            extra={
                "models": list(self._models()),
                "ema": EMA_NAME in self.objects,
                "epoch_complete": self.epoch_complete,
                "config": self.config,
                "history_len": len(self._history),
            },
            before_commit=self._history.sync,
            after_commit=self._update_soup,
        )
        return save(request, background=background)  # type: ignore[no-any-return]  # None in the background

    def _update_soup(self, info: CheckpointInfo) -> None:
        if self.running_soup is not None and self.is_writer:  # rank 0 alone, in a sharded job
            self.running_soup.update(self.run)

    def _stage(self, *, host_copy: bool = False) -> list[tuple[str, FileWriter]]:
        """The files of a checkpoint of the current state: `state.pt`, each model, the EMA.

        `host_copy` writes copies in host memory (`async_save.stage`), so training can
        change the live tensors while a background thread writes them.
        """
        models = self._models()
        payload, ema_weights = build_payload(
            self.objects,
            skip={*models, *(ShardedCheckpointer.kept_apart(self.objects) if self.sharded else ())},
            manager=self.state_dict(),
            where=f"the state of run {self.run.path}",
            step=self.global_step,
            epoch=self.epoch,
            epoch_complete=self.epoch_complete,
            config=self.config,
            extras=dict(self.extras),
        )
        in_files = {} if self.sharded else models
        if self.sharded:
            ema_weights = None  # saved through DCP beside the models (ShardedCheckpointer.state)
        copy = self._stager.session() if host_copy else None
        return checkpoint_files(payload, in_files, ema_weights, copy=copy)

    def pin(self, name: str, pinned: bool = True) -> CheckpointInfo:
        """Pin a checkpoint so retention never deletes it (or unpin it)."""
        self._check_open()
        if not self.is_writer:
            return self.run.get(name)
        self.wait()  # the background save writes into the run; one writer at a time
        return self.run.set_pinned(name, pinned)

    # -- the manager's own state ---------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        best = self.best
        return {
            "global_step": self.global_step,
            "epoch": self.epoch,
            "epoch_complete": self.epoch_complete,
            "monitor": self.monitor_spec,
            "best": {"name": best.name, "value": best.metrics.get(self.monitor or "")} if best else None,
            "resumed_from": self.resumed_from,
            "kept": [c.name for c in self.run.checkpoints()],
            **self.engine.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.global_step = int(state["global_step"])
        self.epoch = int(state["epoch"])
        self.epoch_complete = bool(state["epoch_complete"])
        self.engine.load_state_dict(state)

    # -- resuming ----------------------------------------------------------------------

    def resume(
        self,
        which: str | int = "latest",
        *,
        fallback: bool = False,
        strict: bool = True,
        verify: bool = True,
        restore_rng: bool = True,
    ) -> ResumePoint | None:
        """Restore everything from a checkpoint; None when `which="latest"` and the run is empty.

        `which`: "latest", "best", a checkpoint name, a step number, or the path of a
        checkpoint directory (of this run or another). With `fallback=True` a corrupt
        checkpoint is skipped for the previous one. `verify` recomputes checksums
        (overlapped with loading) before anything is changed. (`ladle.saving.resume`)
        """
        self._check_open()
        self.wait()
        return resume(self, which, fallback=fallback, strict=strict, verify=verify, restore_rng=restore_rng)

    def _checkpointer(self, group: Any = None) -> ShardedCheckpointer:
        return ShardedCheckpointer.of(self.objects, group=group)

    def restore_best(self) -> CheckpointInfo | None:
        """Load the best checkpoint's model weights into the live models, and its EMA into the EMA.

        In a sharded run this reads through DCP: a collective call, made on every rank.
        """
        self._check_open()
        best = self.best
        if best is None:
            log.warning("restore_best: no checkpoint has a finite %r", self.monitor)
            return None
        if self.sharded and is_sharded_checkpoint(best):
            with_ema = self.ema is not None and bool(best.extra.get("ema"))
            if self.ema is not None and not with_ema:
                log.warning("restore_best: %s holds no EMA weights; the EMA is left as it is", best.name)
            self._checkpointer().load_weights_into(best, ema=with_ema)  # the EMA keeps its counters
            return best
        weights = read_model_weights(self.run.storage, best, self._models(), strict=True)
        ema_weights = read_ema_weights(self.run.storage, best) if self.ema is not None else None
        if self.ema is not None and ema_weights is None:
            log.warning("restore_best: %s holds no EMA weights; the EMA is left as it is", best.name)
        for name, tensors in weights.items():
            load_model_weights(self.objects[name], tensors)
        if ema_weights is not None:
            counters = {k: v for k, v in self.ema.state_dict().items() if k != "weights"}
            self.ema.load_state_dict({**counters, "weights": ema_weights})
        return best

    # -- soups -------------------------------------------------------------------------

    def soup(self, recipe: str, output: str | None = None, **kwargs: Any) -> Any:
        """Average this run's checkpoints by `recipe` (see `ladle.soup`)."""
        from ladle.averaging.soups import soup

        return soup(self.run, recipe, output=output, **kwargs)


def _fspath(run_dir: Any) -> str:
    try:
        return os.fspath(run_dir)
    except TypeError:
        raise ConfigError(
            f"run_dir={run_dir!r} is not allowed; use a directory path or URL (a non-empty string)"
        ) from None


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _wait_for_run(run_dir: str, storage_options: Mapping[str, Any] | None) -> Run:
    """A read-only view of the run for non-writing ranks (rank 0 creates it)."""
    deadline = time.monotonic() + 60
    while True:
        try:
            return Run(run_dir, storage_options=storage_options)
        except FileNotFoundError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
