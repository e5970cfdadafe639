"""CheckpointManager: triggers + retention + complete state + early stopping + exact resume.

The front door of ladle for a training loop:

    with ladle.CheckpointManager("runs/exp1", model=model, optimizer=opt, scheduler=sched,
                                 monitor="val_loss", mode="min", keep=ladle.Keep(last=3, best=2)) as mgr:
        start = mgr.resume()                      # None for a fresh run
        ...
        mgr.step(step, metrics={"loss": loss})    # saves when a trigger fires
        mgr.epoch_end(epoch, metrics={"val_loss": v})
"""

from __future__ import annotations

import json
import logging
import re
import signal
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ladle.errors import (
    CheckpointNotFound,
    ConfigError,
    CorruptCheckpoint,
    ManagerClosed,
    StateMismatch,
)
from ladle.metrics import Mode
from ladle.policies.retention import Keep, Policy, prune
from ladle.policies.rules import SaveRules
from ladle.policies.stopping import EarlyStopping
from ladle.policies.triggers import Clock, Event, EveryEpochs, Trigger
from ladle.state.model_weights import (
    ALIASES_KEY,
    STATE_FORMAT,
    check_model_fits,
    check_weights_only,
    is_stateful,
    kind_of,
    load_model_weights,
    model_weights,
    tensors_for_safetensors,
    with_aliases,
)
from ladle.state.rng import capture_rng, restore_rng
from ladle.store.history import HistoryLog
from ladle.store.run import CheckpointInfo, Run, check_readable, checkpoint_name, sha256_file

log = logging.getLogger("ladle")

STATE_FILE = "state.pt"
EMA_NAME = "ema"
_OBJECT_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,63}$")
_RESERVED = {"state", "meta", "history", "manager", "ladle"}


@dataclass(frozen=True)
class ResumePoint:
    """Where a resumed run continues.

    `step` is the step value the checkpoint was saved with (steps completed);
    `epoch` is the epoch to run next: the interrupted one when the save happened
    mid-epoch, the following one when it happened at `epoch_end`.
    """

    step: int
    epoch: int
    checkpoint: CheckpointInfo
    mid_epoch: bool


class CheckpointManager:
    """Saves and restores the complete training state of a run; one writer per run.

    Pass the objects to checkpoint by name (`model=`, `optimizer=`, `scheduler=`,
    `scaler=`, `ema=`, `early_stopping=`, `data=`, or any `state={name: obj}`):
    anything with `state_dict()`/`load_state_dict()` joins; `nn.Module`s are saved
    as safetensors weights. Triggers decide when `step()`/`epoch_end()` save (with
    none given, every epoch end saves); `keep=` decides what survives.
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
        monitor: str | None = None,
        mode: Mode | str = Mode.MIN,
        every_steps: int | None = None,
        every_epochs: int | None = None,
        every_seconds: float | None = None,
        on_improvement: bool = False,
        thresholds: Sequence[float] | None = None,
        triggers: Sequence[Trigger] = (),
        keep: Keep | Sequence[Policy] | None = None,
        config: Mapping[str, Any] | None = None,
        save_on_signal: bool = False,
        exit_after_signal_save: bool = True,
        running_soup: Any = None,
    ) -> None:
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
        if monitor is None and early_stopping is not None:
            monitor, mode = early_stopping.metric, early_stopping.mode
        rules = SaveRules(
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
        self.monitor = monitor
        self.mode = Mode(rules.mode)
        self.triggers = rules.build_triggers(default=EveryEpochs(n=1))
        self.policies = rules.policies()
        if config is not None:
            try:
                json.dumps(config)
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"config must be JSON-serializable ({exc}); pass plain values") from None
        self.config = dict(config) if config is not None else None
        self.extras: dict[str, Any] = {}
        self.global_step = 0
        self.epoch = 0
        self.epoch_complete = False
        self.resumed_from: str | None = None
        self.running_soup = running_soup
        self._last_saved: CheckpointInfo | None = None
        self._metrics_step = 0
        self._current_metrics: dict[str, Any] = {}
        self._clock = Clock()
        self._closed = False
        self._signal: int | None = None
        self._previous_handlers: dict[int, Any] = {}
        self._exit_after_signal_save = exit_after_signal_save
        # In a torch.distributed job every rank builds a manager and resumes; only rank 0
        # writes (the model is replicated under DDP), so the others take no lock.
        self.is_writer = _rank() == 0
        self.run = Run(run_dir, create=self.is_writer) if self.is_writer else _wait_for_run(run_dir)
        if self.is_writer:
            self.run.acquire()
        self._history = HistoryLog(self.run, write=self.is_writer)
        if save_on_signal:
            self._install_signal_handlers()

    # -- construction helpers ----------------------------------------------------------

    def _register(self, name: str, obj: Any) -> None:
        if not _OBJECT_NAME.match(name) or name in _RESERVED:
            raise ConfigError(
                f"state name {name!r} is not allowed; use a short identifier other than {sorted(_RESERVED)}"
            )
        if name in self.objects:
            raise ConfigError(f"state name {name!r} is given twice; use distinct names")
        if not is_stateful(obj):
            raise ConfigError(
                f"state[{name!r}] is a {type(obj).__name__} without state_dict()/load_state_dict(); "
                "wrap it in an object that has both"
            )
        if name == EMA_NAME and kind_of(obj) != "ema":
            raise ConfigError("the name 'ema' is reserved for a ladle.EMA; pick another name")
        self.objects[name] = obj

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
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)
        self._previous_handlers.clear()
        self._history.close()
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
    def monitor_spec(self) -> dict[str, str] | None:
        return {"metric": self.monitor, "mode": self.mode.value} if self.monitor else None

    @property
    def latest(self) -> CheckpointInfo | None:
        return self.run.latest(kind="train")

    @property
    def best(self) -> CheckpointInfo | None:
        if self.monitor is None:
            return None
        return self.run.best(self.monitor, self.mode)

    @property
    def history(self) -> list[dict[str, Any]]:
        """Every metric reported in this run's lineage: `{kind, step, epoch, time, metrics}`."""
        return self._history.entries

    @property
    def should_stop(self) -> bool:
        """True once early stopping has decided to stop (or a signal asked to)."""
        es = self.early_stopping
        return bool(es is not None and es.should_stop)

    @property
    def stop_reason(self) -> str | None:
        return self.early_stopping.reason if self.early_stopping is not None else None

    # -- the training loop's calls -------------------------------------------------------

    def step(
        self, step: int, *, metrics: Mapping[str, Any] | None = None, epoch: int | None = None
    ) -> CheckpointInfo | None:
        """Call once per optimizer step with the number of steps completed; saves if a trigger fires."""
        self._check_open()
        self.global_step = int(step)
        if epoch is not None:
            self.epoch = int(epoch)
        self.epoch_complete = False
        self._record("step", metrics)
        event = Event("step", self.global_step, self.epoch, dict(metrics or {}), self._clock.elapsed())
        fired = [t.fires(event) for t in self.triggers]
        saved = self.save() if any(fired) else None
        return self._after_event(saved)

    def epoch_end(
        self, epoch: int, *, metrics: Mapping[str, Any] | None = None, step: int | None = None
    ) -> CheckpointInfo | None:
        """Call at the end of each epoch (0-based); updates early stopping, saves if a trigger fires."""
        self._check_open()
        self.epoch = int(epoch)
        if step is not None:
            self.global_step = int(step)
        self.epoch_complete = True
        self._record("epoch", metrics)
        values = dict(metrics or {})
        stopped_now = False
        es = self.early_stopping
        if es is not None and not es.should_stop and es.metric in values:
            stopped_now = es.update(values[es.metric], epoch=self.epoch)
        event = Event("epoch", self.global_step, self.epoch, values, self._clock.elapsed())
        fired = [t.fires(event) for t in self.triggers]
        saved = self.save() if any(fired) or stopped_now else None
        if stopped_now:
            log.info("early stopping: %s", es.reason if es else "")
            if es is not None and es.restore_best:
                self.restore_best()
        return self._after_event(saved)

    def _record(self, kind: str, metrics: Mapping[str, Any] | None) -> None:
        # Metrics reported at the current step accumulate, so a save() at this step
        # records all of them (training loss from step(), validation from epoch_end()).
        if self._metrics_step != self.global_step:
            self._metrics_step, self._current_metrics = self.global_step, {}
        self._current_metrics.update(metrics or {})
        if metrics:
            self._history.append(
                {
                    "kind": kind,
                    "step": self.global_step,
                    "epoch": self.epoch,
                    "time": time.time(),
                    "metrics": {k: _plain(v) for k, v in metrics.items()},
                }
            )

    def _after_event(self, saved: CheckpointInfo | None) -> CheckpointInfo | None:
        if self._signal is not None:
            signum, self._signal = self._signal, None
            saved = saved or self.save()
            log.warning("saved %s after signal %d", saved.name, signum)
            if self._exit_after_signal_save:
                self.close()
                if signum == signal.SIGINT:
                    raise KeyboardInterrupt
                raise SystemExit(128 + signum)
        return saved

    # -- saving ------------------------------------------------------------------------

    def save(
        self,
        step: int | None = None,
        epoch: int | None = None,
        metrics: Mapping[str, Any] | None = None,
        *,
        pin: bool = False,
    ) -> CheckpointInfo:
        """Save the complete state now, as a new checkpoint, then apply retention.

        On ranks other than 0 of a distributed job nothing is written and the newest
        checkpoint known to this process is returned.
        """
        self._check_open()
        if step is not None:
            self.global_step = int(step)
        if epoch is not None:
            self.epoch = int(epoch)
        if not self.is_writer:
            self.run.refresh()
            return self.run.latest(kind="train")  # type: ignore[return-value]
        current = self._current_metrics if self._metrics_step == self.global_step else {}
        metrics = {**current, **(metrics or {})}
        last = self._last_saved
        if (
            last is not None
            and last.step == self.global_step
            and last.extra.get("epoch_complete") == self.epoch_complete
            and all(k in last.metrics for k in metrics)
            and not pin
        ):
            return last  # the same state was just saved; nothing new to record
        superseded = last.name if last is not None and last.step == self.global_step else None
        info = self._write(metrics, pin)
        self._last_saved = info
        self._clock.reset()
        self._apply_retention(extra=[superseded] if superseded else [])
        if self.running_soup is not None:
            self.running_soup.update(self.run)
        return info

    def _write(self, metrics: dict[str, Any], pin: bool) -> CheckpointInfo:
        pending = self.run.begin(self.run.free_name(checkpoint_name(self.global_step)))
        try:
            models = [n for n, o in self.objects.items() if isinstance(o, nn.Module)]
            payload, ema_weights = self._payload(models)
            check_weights_only(payload, f"the state of run {self.run.path}")
            pending.write(STATE_FILE, lambda path: torch.save(payload, path))
            for name in models:
                tensors, aliases = model_weights(self.objects[name])
                _write_safetensors(pending, f"{name}.safetensors", tensors, aliases)
            if ema_weights is not None:
                tensors, aliases = tensors_for_safetensors(ema_weights)
                _write_safetensors(pending, f"{EMA_NAME}.safetensors", tensors, aliases)
            self._history.sync()
            return pending.commit(
                step=self.global_step,
                epoch=self.epoch,
                metrics=metrics,
                monitor=self.monitor_spec,
                pinned=pin,
                extra={
                    "models": models,
                    "ema": ema_weights is not None,
                    "epoch_complete": self.epoch_complete,
                    "config": self.config,
                    "history_len": len(self._history),
                },
            )
        except BaseException:
            pending.abort()
            raise

    def _payload(self, models: list[str]) -> tuple[dict[str, Any], dict[str, torch.Tensor] | None]:
        objects: dict[str, Any] = {}
        kinds: dict[str, str] = {}
        ema_weights = None
        for name, obj in self.objects.items():
            if name in models:
                continue
            state = obj.state_dict()
            if name == EMA_NAME:
                state = dict(state)
                ema_weights = state.pop("weights")
            objects[name] = state
            kinds[name] = kind_of(obj)
        objects["manager"] = self.state_dict()
        kinds["manager"] = "manager"
        payload = {
            "format": STATE_FORMAT,
            "objects": objects,
            "kinds": kinds,
            "rng": capture_rng(),
            "step": self.global_step,
            "epoch": self.epoch,
            "epoch_complete": self.epoch_complete,
            "config": self.config,
            "extras": dict(self.extras),
        }
        return payload, ema_weights

    def _apply_retention(self, extra: Sequence[str] = ()) -> None:
        prune(
            self.run,
            self.policies,
            monitor=(self.monitor, self.mode) if self.monitor else None,
            protect=[self.resumed_from] if self.resumed_from else [],
            extra=extra,
        )

    def pin(self, name: str, pinned: bool = True) -> CheckpointInfo:
        """Pin a checkpoint so retention never deletes it (or unpin it)."""
        self._check_open()
        if not self.is_writer:
            return self.run.get(name)
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
            "triggers": [t.state_dict() for t in self.triggers],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.global_step = int(state["global_step"])
        self.epoch = int(state["epoch"])
        self.epoch_complete = bool(state["epoch_complete"])
        saved = state.get("triggers", [])
        if len(saved) == len(self.triggers):
            for trigger, trigger_state in zip(self.triggers, saved, strict=True):
                trigger.load_state_dict(trigger_state)

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
        (overlapped with loading) before anything is changed.
        """
        self._check_open()
        info = self._find(which)
        if info is None:
            return None
        tried: list[str] = []
        while True:
            try:
                point = self._load(info, strict=strict, verify=verify, rng=restore_rng)
                break
            except CorruptCheckpoint as exc:
                if not fallback:
                    raise
                tried.append(info.name)
                older = [
                    c for c in self.run.checkpoints(kind="train") if c.seq < info.seq and c.name not in tried
                ]
                if not older or not self._in_this_run(info):
                    raise CorruptCheckpoint(
                        f"{exc}; no earlier good checkpoint to fall back to (tried {', '.join(tried)})"
                    ) from exc
                log.warning("%s; falling back to %s", exc, older[-1].name)
                info = max(older, key=lambda c: c.seq)
        self.resumed_from = info.name if self._in_this_run(info) else None
        self._last_saved = info if self.resumed_from else None
        self._clock.reset()
        return point

    def _in_this_run(self, info: CheckpointInfo) -> bool:
        return _parent(info.path) == self.run.path

    def _find(self, which: str | int) -> CheckpointInfo | None:
        if which == "latest":
            return self.run.latest(kind="train")
        if which == "best":
            if self.monitor is None:
                raise ConfigError("resume('best') needs monitor='metric name' on the manager")
            if not self.run.checkpoints():
                return None
            best = self.run.best(self.monitor, self.mode)
            if best is None:
                raise CheckpointNotFound(
                    f"{self.run.path}: no checkpoint has a finite {self.monitor!r}; resume 'latest'"
                )
            return best
        if isinstance(which, str) and ("/" in which or which.startswith(".")):
            from ladle.store.storage import storage_for

            storage, path = storage_for(which)
            if storage.isfile(storage.join(path, "meta.json")):
                parent = path.rstrip("/").rsplit("/", 1)[0]
                if parent == self.run.path:
                    self.run.refresh()
                    return self.run.get(path.rsplit("/", 1)[-1])
                return Run(parent).get(path.rsplit("/", 1)[-1])
            raise CheckpointNotFound(
                f"{which}: not a checkpoint directory (no meta.json); pass a checkpoint's "
                "directory, its name, or 'latest'/'best'"
            )
        return self.run.get(which)

    def _load(self, info: CheckpointInfo, *, strict: bool, verify: bool, rng: bool) -> ResumePoint:
        storage = self.run.storage if self._in_this_run(info) else Run(_parent(info.path)).storage
        for filename in info.files:
            check_readable(storage, info, filename)
        hashing = ThreadPoolExecutor(max_workers=2, thread_name_prefix="ladle-verify")
        digests = {f: hashing.submit(sha256_file, storage, info.file(f)) for f in info.files if verify}
        try:
            loaded_models = self._read_models(storage, info, strict)
            payload = self._read_payload(storage, info)
            ema_weights = self._read_ema(storage, info)
            for filename, future in digests.items():
                if future.result() != info.files[filename].sha256:
                    raise CorruptCheckpoint(
                        f"{info.file(filename)}: checksum does not match meta.json (corrupted); "
                        "resume(fallback=True) uses the previous good checkpoint"
                    )
        finally:
            hashing.shutdown(wait=True)
        self._check_objects(info, payload, loaded_models, strict)
        # Everything is read and checked: only now change the live objects.
        for name, weights in loaded_models.items():
            load_model_weights(self.objects[name], weights, strict=strict)
        if payload is not None:
            saved = payload["objects"]
            for name, obj in self.objects.items():
                if name in loaded_models or name not in saved:
                    continue
                state = saved[name]
                if name == EMA_NAME:
                    if ema_weights is None:
                        raise CorruptCheckpoint(f"{info.path}: ema.safetensors is missing")
                    state = {**state, "weights": ema_weights}
                obj.load_state_dict(state)
            self.load_state_dict(saved["manager"])
            self.extras = dict(payload.get("extras") or {})
            if rng:
                restore_rng(payload["rng"])
        else:
            self.global_step, self.epoch, self.epoch_complete = info.step, info.epoch or 0, True
        self._history.restart_from(
            info.name if self._in_this_run(info) else None, info.extra.get("history_len")
        )
        epoch = self.epoch + 1 if self.epoch_complete else self.epoch
        log.info("resumed from %s (step %d)", info.name, self.global_step)
        return ResumePoint(
            step=self.global_step, epoch=epoch, checkpoint=info, mid_epoch=not self.epoch_complete
        )

    def _read_models(
        self, storage: Any, info: CheckpointInfo, strict: bool
    ) -> dict[str, dict[str, torch.Tensor]]:
        from safetensors import safe_open

        found: dict[str, dict[str, torch.Tensor]] = {}
        for name, obj in self.objects.items():
            if not isinstance(obj, nn.Module):
                continue
            filename = f"{name}.safetensors"
            if filename not in info.files:
                raise StateMismatch(
                    f"{info.path}: holds no weights for model {name!r} (files: "
                    f"{', '.join(sorted(info.files))}); register the same names as the saving run"
                )
            path = storage.local_path(info.file(filename)) or _download(storage, info.file(filename))
            try:
                with safe_open(path, framework="pt") as handle:
                    metadata = handle.metadata() or {}
                    shapes = {
                        k: (tuple(handle.get_slice(k).get_shape()), None)
                        for k in handle.keys()  # noqa: SIM118
                    }
                    aliases = json.loads(metadata.get(ALIASES_KEY, "{}"))
                    for alias, target in aliases.items():
                        shapes[alias] = shapes[target]
                    if strict:
                        check_model_fits(obj, shapes, info.file(filename))
                    tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
            except (StateMismatch, CorruptCheckpoint):
                raise
            except Exception as exc:
                raise CorruptCheckpoint(
                    f"{info.file(filename)}: cannot be read ({type(exc).__name__}: {exc}); "
                    "resume(fallback=True) uses the previous good checkpoint"
                ) from exc
            found[name] = with_aliases(tensors, metadata)
        return found

    def _read_payload(self, storage: Any, info: CheckpointInfo) -> dict[str, Any] | None:
        if STATE_FILE not in info.files:
            if info.kind == "train":
                raise CorruptCheckpoint(f"{info.path}: {STATE_FILE} is missing from meta.json")
            log.warning("%s holds weights only (%s); training state starts fresh", info.name, info.kind)
            return None
        path = info.file(STATE_FILE)
        try:
            local = storage.local_path(path)
            if local is not None:  # a path lets torch read without Python file calls
                payload = torch.load(local, map_location="cpu", weights_only=True)
            else:
                with storage.open(path, "rb") as handle:
                    payload = torch.load(handle, map_location="cpu", weights_only=True)
            if not isinstance(payload, dict) or payload.get("format") != STATE_FORMAT:
                raise ValueError("not a ladle state file")
        except Exception as exc:
            raise CorruptCheckpoint(
                f"{path}: cannot be read ({type(exc).__name__}: {str(exc).splitlines()[0][:120]}); "
                "resume(fallback=True) uses the previous good checkpoint"
            ) from exc
        return payload

    def _read_ema(self, storage: Any, info: CheckpointInfo) -> dict[str, torch.Tensor] | None:
        filename = f"{EMA_NAME}.safetensors"
        if EMA_NAME not in self.objects or filename not in info.files:
            return None
        from safetensors import safe_open

        path = storage.local_path(info.file(filename)) or _download(storage, info.file(filename))
        try:
            with safe_open(path, framework="pt") as handle:
                tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
                return with_aliases(tensors, handle.metadata())
        except Exception as exc:
            raise CorruptCheckpoint(f"{info.file(filename)}: cannot be read ({exc})") from exc

    def _check_objects(
        self,
        info: CheckpointInfo,
        payload: dict[str, Any] | None,
        models: Mapping[str, Any],
        strict: bool,
    ) -> None:
        if payload is None:
            return
        saved = set(payload["objects"]) - {"manager"}
        live = {n for n in self.objects if n not in models}
        missing, unexpected = sorted(live - saved), sorted(saved - live)
        if (missing or unexpected) and strict:
            parts = []
            if missing:
                parts.append(f"no saved state for {missing}")
            if unexpected:
                parts.append(f"saved state for unregistered {unexpected}")
            raise StateMismatch(
                f"{info.file(STATE_FILE)}: {'; '.join(parts)}; register the same objects as the "
                "saving run, or resume(strict=False) to skip them"
            )
        if missing or unexpected:
            log.warning("resume(strict=False): skipping %s", missing + unexpected)

    def restore_best(self) -> CheckpointInfo | None:
        """Load the best checkpoint's model (and EMA) weights into the live models."""
        self._check_open()
        best = self.best
        if best is None:
            log.warning("restore_best: no checkpoint has a finite %r", self.monitor)
            return None
        weights = self._read_models(self.run.storage, best, strict=True)
        for name, tensors in weights.items():
            load_model_weights(self.objects[name], tensors)
        return best

    # -- soups -------------------------------------------------------------------------

    def soup(self, recipe: str, output: str | None = None, **kwargs: Any) -> Any:
        """Average this run's checkpoints by `recipe` (see `ladle.soup`)."""
        from ladle.averaging.soups import soup

        return soup(self.run, recipe, output=output, **kwargs)

    # -- preemption ----------------------------------------------------------------------

    def _install_signal_handlers(self) -> None:
        def handler(signum: int, frame: Any) -> None:
            if self._signal is not None:
                # A second signal: the user insists, give way to the previous handler.
                previous = self._previous_handlers.get(signum)
                if callable(previous):
                    previous(signum, frame)
                raise SystemExit(128 + signum)
            self._signal = signum
            log.warning("signal %d: saving at the next step()/epoch_end() call", signum)

        for signum in (signal.SIGTERM, signal.SIGINT):
            self._previous_handlers[signum] = signal.signal(signum, handler)

    @property
    def preempted(self) -> bool:
        """True when a signal arrived and the final save is pending."""
        return self._signal is not None


def _parent(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[0]


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _wait_for_run(run_dir: str) -> Run:
    """A read-only view of the run for non-writing ranks (rank 0 creates it)."""
    deadline = time.monotonic() + 60
    while True:
        try:
            return Run(run_dir)
        except FileNotFoundError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    return value if isinstance(value, int | float | str | bool) or value is None else str(value)


def _write_safetensors(
    pending: Any, filename: str, tensors: dict[str, torch.Tensor], aliases: dict[str, str]
) -> None:
    from safetensors.torch import save_file

    metadata = {"format": "pt"}
    if aliases:
        metadata[ALIASES_KEY] = json.dumps(aliases)
    pending.write(filename, lambda path: save_file(tensors, path, metadata=metadata))


def _download(storage: Any, path: str) -> str:
    import os
    import tempfile

    fd, local = tempfile.mkstemp(prefix="ladle-", suffix=".safetensors")
    with os.fdopen(fd, "wb") as out, storage.open(path, "rb") as src:
        while chunk := src.read(8 << 20):
            out.write(chunk)
    return local
