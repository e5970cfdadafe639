"""PyTorch Lightning: `LadleCheckpoint`, a checkpoint callback that saves into a ladle run.

    from ladle import Keep
    from ladle.integrations.lightning import LadleCheckpoint

    ckpt = LadleCheckpoint("runs/exp1", monitor="val_loss", every_steps=500,
                           keep=Keep(last=3, best=3), soup="last:5", load_soup=True)
    trainer = L.Trainer(callbacks=[ckpt], max_steps=5000)
    trainer.fit(module, ckpt_path=ckpt.resume_path())    # None on the first run: a fresh start

Each save is one atomic ladle commit holding three kinds of file:
- `lightning.ckpt`, Lightning's own complete checkpoint (optimizers, schedulers,
  loops, callbacks, hyper-parameters), so everything Lightning does with a
  checkpoint works on it: `trainer.fit(ckpt_path=...)`, `ckpt_path="best"`,
  `Module.load_from_checkpoint(...)`;
- `model.safetensors`, the LightningModule's `state_dict()` with its keys as
  they are (`net.0.weight`), so `ladle avg`/`ladle soup` read it and the
  average loads straight back into the LightningModule;
- `ema.safetensors` when an EMA is asked for (`ema=0.999`).

It subclasses Lightning's `Checkpoint`, so it replaces the default
`ModelCheckpoint` (or runs next to one you add), and it works with both import
names, `lightning.pytorch` and `pytorch_lightning`.
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import fields
from typing import Any

import torch

from ladle.averaging.ema import EMA, EMAConfig
from ladle.averaging.soups import SoupResult
from ladle.errors import CheckpointNotFound, ConfigError, MissingDependency
from ladle.integrations._extras import import_first
from ladle.integrations._resume import find_resumable
from ladle.integrations._saving import RunWriter, safetensors_writer
from ladle.integrations._soup import SoupPlan, soup_into_run, soup_to_file, soup_weights
from ladle.metrics import Mode
from ladle.policies.retention import Keep, Policy
from ladle.policies.rules import SaveRules
from ladle.policies.triggers import EveryEpochs, Trigger
from ladle.store.run import CheckpointInfo, Run, best_of

log = logging.getLogger("ladle")

LIGHTNING_FILE = "lightning.ckpt"
MODEL_FILE = "model.safetensors"
EMA_FILE = "ema.safetensors"


def _checkpoint_bases() -> tuple[type, ...]:
    """Lightning's `Checkpoint` class of every installed import name.

    `lightning.pytorch` and `pytorch_lightning` are two copies of one library whose
    Trainers only recognize their own classes; subclassing both lets one callback
    serve whichever Trainer the user has.
    """
    first = import_first(
        ("lightning.pytorch", "pytorch_lightning"),
        extra="lightning",
        purpose="ladle.integrations.lightning",
    )
    bases = [first.callbacks.Checkpoint]
    other = "pytorch_lightning" if first.__name__.startswith("lightning") else "lightning.pytorch"
    try:
        bases.append(importlib.import_module(other).callbacks.Checkpoint)
    except ImportError:
        pass
    except Exception as exc:  # a broken second copy must not break the working one
        log.debug("not supporting %s Trainers: %s", other, exc)
    return tuple(bases)


_BASES = _checkpoint_bases()


def _ema_config(ema: EMAConfig | float | None) -> EMAConfig | None:
    if ema is None or isinstance(ema, EMAConfig):
        return ema
    if isinstance(ema, bool) or not isinstance(ema, int | float):
        raise ConfigError(f"ema={ema!r}: pass a decay such as 0.999, a ladle.EMAConfig, or None")
    return EMAConfig(decay=float(ema))


def _is_fitting(trainer: Any) -> bool:
    fn = getattr(trainer.state, "fn", None)
    return getattr(fn, "value", fn) == "fit" and not trainer.sanity_checking


def _validation_follows(trainer: Any) -> bool:
    """Whether Lightning runs validation right after the batch that just ended.

    Asked of Lightning's own (private) decision, so that a save due at this step
    waits for the validation and records its metrics instead of being written
    twice. Time-based validation cannot be predicted: then, and whenever the
    question cannot be asked, the answer is no (save now; a later validation at
    the same step re-saves with the new metrics).
    """
    loop = getattr(trainer.fit_loop, "epoch_loop", None)
    check = getattr(loop, "_should_check_val_fx", None)
    fetcher = getattr(trainer.fit_loop, "_data_fetcher", None)
    if check is None or fetcher is None or getattr(trainer, "_val_check_time_interval", None) is not None:
        return False
    if getattr(loop, "_skip_next_val", False):
        return False
    try:
        return bool(check(fetcher))
    except Exception:  # an internal API that changed: fall back to saving at once
        return False


def _epoch_ends(trainer: Any) -> bool:
    """Whether the training epoch ends after the current batch (so `on_train_epoch_end` follows)."""
    loop = getattr(trainer.fit_loop, "epoch_loop", None)
    try:
        return bool(loop is not None and loop.done)
    except Exception:  # an internal API that changed: fall back to saving at once
        return False


def _scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
    out = {}
    for key, value in metrics.items():
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                continue
            value = value.item()
        if isinstance(value, int | float) and not isinstance(value, bool):
            out[key] = float(value)
    return out


class LadleCheckpoint(*_BASES):  # type: ignore[misc]
    """Save Lightning checkpoints into a ladle run: triggers, atomic commits, retention, EMA, soups.

    With no trigger given it saves at every epoch end, like `ModelCheckpoint`.
    Metrics recorded with each checkpoint are those Lightning knows at that
    moment (`trainer.callback_metrics`), validation metrics only when the
    validation ran at that very step, so `top:5:val_loss:min` never picks a
    checkpoint by the score of an older one.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike[str],
        *,
        monitor: str | None = None,
        mode: Mode | str = Mode.MIN,
        every_steps: int | None = None,
        every_epochs: int | None = None,
        every_seconds: float | None = None,
        on_improvement: bool = False,
        thresholds: Sequence[float] | None = None,
        triggers: Sequence[Trigger] = (),
        keep: Keep | Sequence[Policy] | None = None,
        ema: EMAConfig | float | None = None,
        save_at_end: bool = False,
        soup: str | None = None,
        soup_output: str | os.PathLike[str] | None = None,
        load_soup: bool = False,
        soup_options: Mapping[str, Any] | None = None,
    ) -> None:
        """
        Args:
            run_dir: the ladle run to save into (created if missing).
            monitor, mode: the metric that defines "best" (for `keep`, `on_improvement`,
                `best_model_path`, `top:K` recipes) and its direction.
            every_steps, every_epochs, every_seconds, on_improvement, thresholds, triggers:
                when to save (any firing saves); default: every epoch end.
            keep: retention, e.g. `Keep(last=3, best=3)`; None keeps every checkpoint.
            ema: keep an exponential moving average of the weights (a decay, or an
                `EMAConfig`), saved as `ema.safetensors` and restored on resume.
            save_at_end: also save when training ends (e.g. at `max_steps` mid-epoch).
            soup: a recipe ("last:5", "top:5:val_loss:min", ...) averaged when fit ends.
            soup_output: where the soup's weights go (default: inside the run).
            load_soup: load the soup's weights into the LightningModule after fit.
            soup_options: more arguments of `ladle.soup` (`weights=`, `window=`, `key="ema"` ...).
        """
        super().__init__()
        self.run_dir = os.fspath(run_dir)
        self.rules = SaveRules(
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
        self.writer = RunWriter(self.run_dir, self.rules, default_trigger=EveryEpochs(n=1))
        self.ema_config = _ema_config(ema)
        self.save_at_end = bool(save_at_end)
        self.soup_plan = SoupPlan(recipe=soup, output=soup_output, load=load_soup, options=soup_options)
        self.ema: EMA | None = None
        """The EMA of the LightningModule's weights, once fit has started (with `ema=`)."""
        self.soup_result: SoupResult | None = None
        """What the end-of-fit soup wrote, once it has."""
        self._ema_state: dict[str, Any] | None = None
        self._eval_keys: set[str] = set()
        self._eval_step: int | None = None
        self._before_eval: dict[str, float] = {}
        self._last_step: int | None = None
        self._pending: int | None = None
        self._epoch = 0

    # -- identity and the paths Lightning asks checkpoint callbacks for ----------------

    @property
    def state_key(self) -> str:
        return self._generate_state_key(run_dir=self.run_dir)

    def _run(self) -> Run | None:
        if self.writer.run is not None:
            return self.writer.run
        if not os.path.isdir(self.run_dir):
            return None
        return Run(self.run_dir)

    def _path_of(self, info: CheckpointInfo | None) -> str:
        return info.file(LIGHTNING_FILE) if info is not None and info.has(LIGHTNING_FILE) else ""

    def _trainable(self, run: Run) -> list[CheckpointInfo]:
        return [c for c in run.checkpoints(kind="train") if c.has(LIGHTNING_FILE)]

    @property
    def last_model_path(self) -> str:
        """The newest checkpoint's `lightning.ckpt` ("" when the run has none)."""
        run = self._run()
        found = self._trainable(run) if run is not None else []
        return self._path_of(max(found, key=lambda c: c.seq) if found else None)

    @property
    def best_model_path(self) -> str:
        """The best checkpoint's `lightning.ckpt` by `monitor` ("" without one); for `ckpt_path="best"`."""
        return self._path_of(self._best())

    @property
    def best_model_score(self) -> float | None:
        best = self._best()
        return None if best is None else float(best.metrics[self.rules.monitor or ""])

    def _best(self) -> CheckpointInfo | None:
        run = self._run()
        if run is None or self.rules.monitor is None:
            return None
        return best_of(self._trainable(run), self.rules.monitor, self.rules.mode)

    def resume_path(self, which: str | int = "latest", *, verify: bool = True) -> str | None:
        """The `lightning.ckpt` to pass as `trainer.fit(ckpt_path=...)`; None when the run has none.

        `which`: "latest", "best", a checkpoint name or a step. With `verify`, the
        checkpoint's sizes and checksums are checked first; a damaged latest
        checkpoint is skipped for the newest good one (with a warning), any other
        is an error.
        """
        info = find_resumable(self.run_dir, which, needs=LIGHTNING_FILE, verify=verify)
        return None if info is None else info.file(LIGHTNING_FILE)

    # -- lifecycle -------------------------------------------------------------------

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage != "fit" or trainer.fast_dev_run:
            return
        _check_strategy(trainer.strategy)
        if trainer.is_global_zero:
            self.writer.open()

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        if self.ema_config is not None:
            cfg = self.ema_config
            self.ema = EMA(pl_module, **{f.name: getattr(cfg, f.name) for f in fields(cfg)})
            if self._ema_state is not None:
                self.ema.load_state_dict(self._ema_state)
                self._ema_state = None

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self._last_step = trainer.global_step
        self._epoch = trainer.current_epoch
        run = self.writer.run
        ckpt = trainer.ckpt_path
        if run is None or not ckpt:
            return
        folder = os.path.dirname(os.path.abspath(os.fspath(ckpt)))
        if os.path.realpath(os.path.dirname(folder)) == os.path.realpath(run.path):
            name = os.path.basename(folder)
            try:
                info = run.get(name)
            except CheckpointNotFound:
                return
            self.writer.resumed_from = name
            self.writer.last_saved = info
            log.info("resuming %s from %s", self.run_dir, name)

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage == "fit":
            self.writer.close()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self.writer.close()

    # -- events ----------------------------------------------------------------------

    def _metrics(self, trainer: Any) -> dict[str, float]:
        fresh = self._eval_step == trainer.global_step
        metrics = _scalars(trainer.callback_metrics)
        return {k: v for k, v in metrics.items() if fresh or k not in self._eval_keys}

    def _ask(self, trainer: Any, kind: str) -> None:
        """Let the triggers see an event; remember that this step must be saved if any fires."""
        step = trainer.global_step
        if self.writer.fires(kind, step, self._epoch, self._metrics(trainer)):
            self._pending = step

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        # A save is pending here only when a predicted validation did not run; the
        # weights are still those of the pending step, so save them now. Every rank
        # calls _flush, which takes rank 0's word, so collective saves stay in step.
        self._flush(trainer, pl_module)

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step == self._last_step:
            return  # no optimizer step (gradient accumulation): nothing new to save
        self._last_step = step
        self._epoch = trainer.current_epoch
        if self.ema is not None:
            self.ema.update(step=step)
        self._ask(trainer, "step")
        if not (_validation_follows(trainer) or _epoch_ends(trainer)):
            self._flush(trainer, pl_module)

    def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
        if _is_fitting(trainer):
            self._before_eval = _scalars(trainer.callback_metrics)

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if not _is_fitting(trainer):
            return
        after = _scalars(trainer.callback_metrics)
        self._eval_keys |= {k for k, v in after.items() if self._before_eval.get(k) != v}
        self._eval_step = trainer.global_step
        self._ask(trainer, "step")
        if not _epoch_ends(trainer):
            self._flush(trainer, pl_module)

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        self._epoch = trainer.current_epoch
        self._ask(trainer, "epoch")
        self._flush(trainer, pl_module)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        if self.save_at_end:
            self._pending = trainer.global_step
        self._flush(trainer, pl_module)
        if trainer.is_global_zero:
            self.writer.warn_if_monitor_unrecorded()

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        plan = self.soup_plan
        if plan.recipe is None or trainer.fast_dev_run:
            return
        path = None
        if trainer.is_global_zero:
            run = self.writer.open()
            if plan.output is None:
                self.soup_result = soup_into_run(run, plan)
                assert self.soup_result.checkpoint is not None
                path = self.soup_result.checkpoint.file(MODEL_FILE)
            else:
                self.soup_result = soup_to_file(run, plan, plan.output)
                path = self.soup_result.path
        if not plan.load:
            return
        if trainer.world_size > 1:
            path = trainer.strategy.broadcast(path, src=0)
        if self.soup_result is not None:
            weights = soup_weights(self.soup_result)
        else:
            from safetensors.torch import load_file

            weights = load_file(path)
        pl_module.load_state_dict(weights)
        log.info("loaded the soup %s into the LightningModule", path)

    # -- saving ----------------------------------------------------------------------

    def _flush(self, trainer: Any, pl_module: Any) -> None:
        """Save the pending step (all ranks take part; rank 0 writes)."""
        pending = self._pending
        if trainer.world_size > 1:
            pending = trainer.strategy.broadcast(pending, src=0)
        if pending is None or trainer.fast_dev_run:
            return
        self._pending = None
        step = trainer.global_step
        metrics = self._metrics(trainer)
        skip = trainer.is_global_zero and self.writer.already_saved(step, metrics)
        if trainer.world_size > 1:
            skip = trainer.strategy.broadcast(skip, src=0)
        if skip:
            return
        # Gathering the weights (and Lightning's save) are collective under some strategies.
        weights = trainer.strategy.lightning_module_state_dict()
        if not trainer.is_global_zero:
            trainer.save_checkpoint(os.path.join(self.run_dir, LIGHTNING_FILE), weights_only=False)
            return
        files = [
            (MODEL_FILE, safetensors_writer(weights)),
            (LIGHTNING_FILE, lambda path: _save_lightning(trainer, path)),
        ]
        if self.ema is not None:
            files.append((EMA_FILE, safetensors_writer(self.ema.weights())))
        name = self.writer.free_name(f"step-{step:09d}")
        self.writer.commit(
            name,
            files,
            step=step,
            epoch=self._epoch,
            metrics=metrics,
            extra={"models": ["model"], "ema": self.ema is not None, "framework": "lightning"},
        )

    # -- Lightning's callback state (stored inside lightning.ckpt) --------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            **self.writer.state_dict(),
            "eval_keys": sorted(self._eval_keys),
            "ema": self.ema.state_dict() if self.ema is not None else None,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.writer.load_state_dict(state_dict)
        self._eval_keys = set(state_dict.get("eval_keys") or [])
        ema_state = state_dict.get("ema")
        if ema_state is None:
            return
        if self.ema is not None:
            self.ema.load_state_dict(ema_state)
        elif self.ema_config is not None:
            self._ema_state = ema_state  # applied when the EMA is built, at fit start
        else:
            log.warning("the checkpoint holds an EMA but LadleCheckpoint(ema=None); it is dropped")


def _check_strategy(strategy: Any) -> None:
    """Refuse, before training, strategies whose checkpoint is a folder of shards."""
    name = type(strategy).__name__
    sharded = (
        name == "DeepSpeedStrategy"
        or (name == "FSDPStrategy" and getattr(strategy, "_state_dict_type", "full") == "sharded")
        or (name == "ModelParallelStrategy" and getattr(strategy, "_save_distributed_checkpoint", True))
    )
    if sharded:
        raise ConfigError(
            f"{name} saves sharded checkpoints (a folder per save), which LadleCheckpoint cannot commit; "
            "use DDP, or FSDP with state_dict_type='full'"
        )


def _save_lightning(trainer: Any, path: str) -> None:
    trainer.save_checkpoint(path, weights_only=False)
    if os.path.isdir(path):
        raise ConfigError(
            f"{path}: the strategy saved a sharded checkpoint (a folder); LadleCheckpoint needs one "
            "file: use a strategy that saves a full state dict (e.g. FSDP state_dict_type='full')"
        )


__all__ = ["LIGHTNING_FILE", "LadleCheckpoint", "MissingDependency"]
