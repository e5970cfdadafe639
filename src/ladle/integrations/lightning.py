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
names, `lightning.pytorch` and `pytorch_lightning`. What it asks of the trainer
(loop state, strategy, Lightning's own file) is `ladle.integrations._lightning_trainer`.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import fields
from typing import Any

from ladle.averaging.ema import EMA
from ladle.averaging.ema_config import EMAConfig
from ladle.averaging.soups import SoupResult
from ladle.errors import CheckpointNotFound, ConfigError, LadleError, MissingDependency
from ladle.integrations._lightning_trainer import (
    check_strategy,
    checkpoint_bases,
    epoch_ends,
    is_fitting,
    save_lightning,
    scalars,
    validation_follows,
    warn_if_order_is_lost,
)
from ladle.integrations._resume import find_resumable
from ladle.integrations._soup import SoupPlan, soup_into_run, soup_to_file, soup_weights
from ladle.metrics import Mode, encode_metrics
from ladle.policies.retention import Keep, Policy
from ladle.policies.rules import SaveRules, rules_from
from ladle.policies.triggers import EveryEpochs, Trigger
from ladle.saving.async_save import HostStager
from ladle.saving.engine import FileWriter, SaveEngine, SaveRequest, safetensors_writer
from ladle.state.model_weights import tensors_for_safetensors
from ladle.state.rng import capture_rng, restore_rng
from ladle.store.checkpoint import CheckpointInfo, best_of
from ladle.store.paths import path_isdir
from ladle.store.run import Run

log = logging.getLogger("ladle")

LIGHTNING_FILE = "lightning.ckpt"
MODEL_FILE = "model.safetensors"
EMA_FILE = "ema.safetensors"


_BASES = checkpoint_bases()


def _ema_config(ema: EMAConfig | float | None) -> EMAConfig | None:
    if ema is None or isinstance(ema, EMAConfig):
        return ema
    if isinstance(ema, bool) or not isinstance(ema, int | float):
        raise ConfigError(f"ema={ema!r}: pass a decay such as 0.999, a ladle.EMAConfig, or None")
    return EMAConfig(decay=float(ema))


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
        ema: EMAConfig | float | None = None,
        save_at_end: bool = False,
        soup: str | None = None,
        soup_output: str | os.PathLike[str] | None = None,
        load_soup: bool = False,
        soup_options: Mapping[str, Any] | None = None,
        async_save: bool = False,
    ) -> None:
        """
        Args:
            run_dir: the ladle run to save into (created if missing).
            rules: when to save and what to keep, as one `ladle.SaveRules(...)`; or the
                short keywords below (not both).
            monitor, mode: the metric that defines "best" (for `keep`, `on_improvement`,
                `best_model_path`, `top:K` recipes) and its direction.
            every_steps, every_epochs, every_seconds, on_improvement, thresholds, triggers:
                when to save (any firing saves); default: every epoch end.
            keep: retention, e.g. `Keep(last=3, best=3)` or an int n (the newest n); None keeps all.
            ema: keep an exponential moving average of the weights (a decay, or an
                `EMAConfig`), saved as `ema.safetensors` and restored on resume.
            save_at_end: also save when training ends (e.g. at `max_steps` mid-epoch).
            soup: a recipe ("last:5", "top:5:val_loss:min", ...) averaged when fit ends.
            soup_output: where the soup's weights go (default: inside the run).
            load_soup: load the soup's weights into the LightningModule after fit.
            soup_options: more arguments of `ladle.soup` (`weights=`, `window=`, `key="ema"` ...).
            async_save: build Lightning's checkpoint and the weights at the save, copy them into
                host memory, and write and commit them in the background (one save in flight;
                an error surfaces at the next save or when fit ends).
        """
        super().__init__()
        self.async_save = bool(async_save)
        self._stager = HostStager()  # its buffers are reused from one background save to the next
        self.run_dir = os.fspath(run_dir)
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
        self.rules = rules_from(rules, given, where="LadleCheckpoint")
        self.writer = SaveEngine(self.run_dir, self.rules, default_trigger=EveryEpochs(n=1), takeover=True)
        """The save engine: triggers, commits, retention (`ladle.saving.engine.SaveEngine`)."""
        self.ema_config = _ema_config(ema)
        self.save_at_end = bool(save_at_end)
        self.soup_plan = SoupPlan(recipe=soup, output=soup_output, load=load_soup, options=soup_options)
        self.ema: EMA | None = None
        """The EMA of the LightningModule's weights, once fit has started (with `ema=`)."""
        self.soup_result: SoupResult | None = None
        """What the end-of-fit soup wrote, once it has."""
        self._ema_state: dict[str, Any] | None = None
        self._rng_state: dict[str, Any] | None = None
        self._eval_keys: set[str] = set()
        self._eval_step: int | None = None
        self._before_eval: dict[str, float] = {}
        self._last_step: int | None = None
        self._pending: int | None = None
        self._reason = ""
        self._epoch = 0

    # -- identity and the paths Lightning asks checkpoint callbacks for ----------------

    @property
    def state_key(self) -> str:
        return self._generate_state_key(run_dir=self.run_dir)

    def _run(self) -> Run | None:
        if self.writer.run is not None:
            return self.writer.run
        if not path_isdir(self.run_dir):  # a local path or a URL (s3://...)
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
        check_strategy(trainer.strategy)
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
        warn_if_order_is_lost(trainer)
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
        try:
            self.writer.close()
        except LadleError as exc:  # a failed background save must not hide the training's error
            log.error("%s", exc)

    # -- events ----------------------------------------------------------------------

    def _metrics(self, trainer: Any) -> dict[str, float]:
        fresh = self._eval_step == trainer.global_step
        metrics = scalars(trainer.callback_metrics)
        return {k: v for k, v in metrics.items() if fresh or k not in self._eval_keys}

    def _ask(self, trainer: Any, kind: str) -> None:
        """Let the triggers see an event; remember that this step must be saved if any fires."""
        step = trainer.global_step
        reason = self.writer.poll(kind, step, self._epoch, self._metrics(trainer))
        if reason:
            self._pending, self._reason = step, reason

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        # A save is pending here only when a predicted validation did not run; the
        # weights are still those of the pending step, so save them now. Every rank
        # calls _flush, which takes rank 0's word, so collective saves stay in step.
        self._flush(trainer, pl_module)
        if self._rng_state is not None:
            # Lightning restores no RNG: put back the generators of the saved moment right before
            # the first batch after it, so dropout and augmentation draw what they would have.
            restore_rng(self._rng_state)
            self._rng_state = None

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
        if not (validation_follows(trainer) or epoch_ends(trainer)):
            self._flush(trainer, pl_module)

    def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
        if is_fitting(trainer):
            self._before_eval = scalars(trainer.callback_metrics)

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if not is_fitting(trainer):
            return
        after = scalars(trainer.callback_metrics)
        fresh = {k for k, v in after.items() if self._before_eval.get(k) != v}
        self._eval_keys |= fresh
        self.writer.note_evaluation(fresh)
        self._eval_step = trainer.global_step
        self._ask(trainer, "step")
        if not epoch_ends(trainer):
            self._flush(trainer, pl_module)

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        self._epoch = trainer.current_epoch
        self._ask(trainer, "epoch")
        self._flush(trainer, pl_module)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        if self.save_at_end:
            self._pending, self._reason = trainer.global_step, "save_at_end"
        self._flush(trainer, pl_module)
        if trainer.is_global_zero:
            self.writer.wait()  # the soup and the check below see every checkpoint
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
        if trainer.is_global_zero:
            self.writer.wait()  # the previous save is committed (and its staging buffers free)
        skip = trainer.is_global_zero and self.writer.already_saved(step, metrics)
        if trainer.world_size > 1:
            skip = trainer.strategy.broadcast(skip, src=0)
        if skip:
            return
        # Gathering the weights (and Lightning's save) are collective under some strategies.
        weights = dict(trainer.strategy.lightning_module_state_dict())
        write_lightning: FileWriter
        if self.async_save:
            # Lightning's checkpoint of this moment, built now on every rank, copied into host memory
            # below: the live trainer state may change while the background thread writes it.
            checkpoint = trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
            if not trainer.is_global_zero:
                return
            ema = self.ema.weights() if self.ema is not None else None
            staged = self._stager.stage({"checkpoint": checkpoint, "weights": weights, "ema": ema})
            weights, ema = staged["weights"], staged["ema"]
            write_lightning = functools.partial(save_lightning, trainer, checkpoint=staged["checkpoint"])
        else:
            if not trainer.is_global_zero:
                trainer.save_checkpoint(os.path.join(self.run_dir, LIGHTNING_FILE), weights_only=False)
                return
            ema = self.ema.weights() if self.ema is not None else None
            write_lightning = functools.partial(save_lightning, trainer)
        files = [
            (MODEL_FILE, safetensors_writer(*tensors_for_safetensors(weights))),
            (LIGHTNING_FILE, write_lightning),
        ]
        if ema is not None:
            files.append((EMA_FILE, safetensors_writer(*tensors_for_safetensors(ema))))
        run = self.writer.open()
        self.writer.save(
            SaveRequest(
                name=run.free_name(f"step-{step:09d}"),
                files=files,
                step=step,
                epoch=self._epoch,
                metrics=encode_metrics(metrics, lenient=True),
                trigger=self._reason or "save",
                extra={"models": ["model"], "ema": self.ema is not None, "framework": "lightning"},
            ),
            background=self.async_save,
        )

    # -- Lightning's callback state (stored inside lightning.ckpt) --------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            **self.writer.state_dict(),
            "eval_keys": sorted(self._eval_keys),
            "rng": capture_rng(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.writer.load_state_dict(state_dict)
        self._eval_keys = set(state_dict.get("eval_keys") or [])
        self._rng_state = state_dict.get("rng")
        ema_state = state_dict.get("ema")
        if ema_state is None:
            return
        if self.ema is not None:
            self.ema.load_state_dict(ema_state)
        elif self.ema_config is not None:
            self._ema_state = ema_state  # applied when the EMA is built, at fit start
        else:
            log.warning("the checkpoint holds an EMA but LadleCheckpoint(ema=None); it is dropped")


__all__ = ["LIGHTNING_FILE", "LadleCheckpoint", "MissingDependency"]
