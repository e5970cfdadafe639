"""transformers Trainer: `LadleCallback`, ladle runs and soups from the Trainer's own checkpoints.

    from ladle import Keep
    from ladle.integrations.transformers import LadleCallback

    callback = LadleCallback(keep=Keep(last=3, best=2), soup="top:3:eval_loss:min")
    trainer = Trainer(model=model, args=args, ..., callbacks=[callback])
    trainer.train()
    model = AutoModelForCausalLM.from_pretrained(f"{args.output_dir}/soup")

At each save of the Trainer, the callback takes the `checkpoint-<step>/`
folder it just wrote, in one of two ways:

- `LadleCallback()` (no `run_dir`) *records* it in place: its files are
  checksummed and a `meta.json` with the metrics of that step (from the
  Trainer's log history) is written last, so the output directory becomes a
  ladle run (`ladle ls`, `ladle verify`, `ladle soup` work on it) and a
  folder the Trainer did not finish writing never counts;
- `LadleCallback(run_dir="runs/x")` *commits* a copy into that run, atomically,
  so it survives the Trainer's own rotation (`save_total_limit`).

Either way `keep=` applies ladle's retention (never deleting the latest, the
best, the one training resumed from, or the Trainer's best checkpoint),
triggers (`every_seconds=`, `on_improvement=` ...) ask the Trainer for extra
saves, and a `soup=` recipe is averaged when training ends into a folder that
`from_pretrained` loads (config and tokenizer files copied from the newest
checkpoint).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ladle.averaging.soups import SoupResult
from ladle.errors import ConfigError, MissingDependency, StateMismatch
from ladle.integrations._extras import import_first
from ladle.integrations._resume import find_resumable
from ladle.integrations._soup import SoupPlan, soup_to_file, soup_weights
from ladle.integrations.trainer_output import (
    CHECKPOINT_PREFIX,
    TRAINER_STATE,
    copy_model_files,
    epoch_index,
    metrics_at,
)
from ladle.metrics import Mode, encode_metrics
from ladle.policies.retention import Keep, Policy
from ladle.policies.rules import SaveRules, rules_from
from ladle.policies.triggers import EveryEpochs, EverySteps, OnImprovement, OnThreshold, Trigger
from ladle.saving.engine import SaveEngine, SaveRequest

log = logging.getLogger("ladle")

_transformers = import_first(
    ("transformers",), extra="transformers", purpose="ladle.integrations.transformers"
)
SOUP_FOLDER = "soup"
WEIGHTS_FILE = "model.safetensors"
_ASYNC_IN_PLACE = (
    "LadleCallback(async_save=True) needs run_dir= (a run other than the Trainer's output_dir): "
    "recording in place would checksum the Trainer's own checkpoint-N/ folders in the background, "
    "while the Trainer may rotate or rewrite them; pass run_dir= or drop async_save"
)


def _same_dir(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    return os.path.realpath(os.fspath(a)) == os.path.realpath(os.fspath(b))


def _agree(flag: bool) -> bool:
    """Rank 0's decision on every process, so all save together (time-based triggers differ per rank)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return flag
    box = [flag]
    dist.broadcast_object_list(box, src=0)
    return bool(box[0])


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


class LadleCallback(_transformers.TrainerCallback):  # type: ignore[misc,name-defined]
    """Record or commit every Trainer checkpoint into a ladle run; retention, extra save triggers, soups."""

    def __init__(
        self,
        run_dir: str | os.PathLike[str] | None = None,
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
        soup: str | None = None,
        soup_output: str | os.PathLike[str] | None = None,
        load_soup: bool = False,
        soup_options: Mapping[str, Any] | None = None,
        async_save: bool = False,
    ) -> None:
        """
        Args:
            run_dir: commit copies of the checkpoints into this ladle run; None records the
                Trainer's own `checkpoint-*/` folders in place (its output_dir becomes the run).
            rules: when to save and what to keep, as one `ladle.SaveRules(...)`; or the short
                keywords below (not both). With `rules=` and `Keep(best=)`, name its `monitor=`.
            monitor, mode: the metric that defines "best" (as logged, e.g. "eval_loss") and its
                direction; default: the Trainer's `metric_for_best_model`/`greater_is_better`,
                else "min".
            every_steps, every_epochs, every_seconds, on_improvement, thresholds, triggers:
                extra saves to ask the Trainer for, on top of its `save_strategy`.
            keep: ladle retention over the run's checkpoints, e.g. `Keep(last=3, best=2)`, or an int
                n (the newest n, like `save_total_limit`).
            soup: a recipe ("last:5", "top:5:eval_loss:min", ...) averaged when training ends.
            soup_output: the folder the soup goes to (default `<output_dir>/soup`); it holds
                `model.safetensors` and the newest checkpoint's config and tokenizer files.
            load_soup: load the soup into the Trainer's model when training ends (after
                `load_best_model_at_end`, which it overrides).
            soup_options: more keyword arguments of `ladle.soup` (`weights=`, `window=` ...).
            async_save: with `run_dir`, copy each Trainer checkpoint into the run at the save and
                checksum, fsync and commit it in the background (one save in flight; an error
                surfaces at the next save or when training ends). Not when recording in place.
        """
        self.run_dir = None if run_dir is None else os.fspath(run_dir)
        self.async_save = bool(async_save)
        if self.async_save and self.run_dir is None:
            raise ConfigError(_ASYNC_IN_PLACE)
        self._explicit_mode = mode is not None or (rules is not None and rules.monitor is not None)
        # Keep(best=) may rely on the Trainer's metric_for_best_model, known at train begin.
        self._keep_later = (
            monitor is None and isinstance(keep, Keep) and keep.best is not None and not keep.metric
        )
        self._keep = keep
        given = dict(
            monitor=monitor,
            mode=mode,
            every_steps=every_steps,
            every_epochs=every_epochs,
            every_seconds=every_seconds,
            on_improvement=on_improvement,
            thresholds=thresholds,
            triggers=triggers,
            keep=None if self._keep_later else keep,
        )
        self.rules = rules_from(rules, given, where="LadleCallback")
        self.soup_plan = SoupPlan(recipe=soup, output=soup_output, load=load_soup, options=soup_options)
        self.writer: SaveEngine | None = None
        """The save engine, once training has begun (its run is opened on the main process only)."""
        self.soup_result: SoupResult | None = None
        """What the end-of-training soup wrote, once it has."""
        self.soup_dir: str | None = None
        """The folder of the end-of-training soup, once written."""
        self._triggers = self.rules.build_triggers(default=None)
        self._reason = ""
        self._deterministic = all(
            isinstance(t, EverySteps | EveryEpochs | OnImprovement | OnThreshold) for t in self._triggers
        )

    # -- where the run is --------------------------------------------------------------

    def _run_dir(self, args: Any) -> str:
        return self.run_dir if self.run_dir is not None else os.fspath(args.output_dir)

    def _records(self, args: Any) -> bool:
        return self.run_dir is None or _same_dir(self.run_dir, args.output_dir)

    def resume_path(
        self,
        which: str | int = "latest",
        *,
        run_dir: str | os.PathLike[str] | None = None,
        verify: bool = True,
    ) -> str | None:
        """The checkpoint folder to pass as `trainer.train(resume_from_checkpoint=...)`; None if none.

        Only committed or recorded checkpoints count, so a folder the Trainer did
        not finish writing is never picked. `run_dir` defaults to the callback's
        (pass the Trainer's output_dir when recording in place). `which`:
        "latest", "best", a name or a step; with `verify` a damaged latest
        checkpoint is skipped for the one before it.
        """
        where = run_dir if run_dir is not None else self.run_dir
        if where is None:
            raise ConfigError(
                "resume_path(): this callback records into the Trainer's output_dir; pass run_dir=output_dir"
            )
        info = find_resumable(where, which, needs=TRAINER_STATE, verify=verify)
        return None if info is None else info.path

    # -- events ----------------------------------------------------------------------

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        rules = self.rules
        if rules.monitor is None and args.metric_for_best_model:
            metric = args.metric_for_best_model
            metric = metric if metric.startswith("eval_") else f"eval_{metric}"
            mode = rules.mode if self._explicit_mode else (Mode.MAX if args.greater_is_better else Mode.MIN)
            rules = dataclasses.replace(rules, monitor=metric, mode=mode)
            self._triggers = rules.build_triggers(default=None)
        if self._keep_later:
            if rules.monitor is None:
                raise ConfigError(
                    "LadleCallback(keep=Keep(best=...)) needs monitor= or the Trainer's metric_for_best_model"
                )
            rules = dataclasses.replace(rules, keep=self._keep)
            self._keep_later = False
        self.rules = rules
        if self.async_save and self._records(args):
            raise ConfigError(_ASYNC_IN_PLACE)
        if getattr(args.save_strategy, "value", args.save_strategy) == "no" and not self._triggers:
            log.warning("save_strategy='no' and no ladle trigger: no checkpoint will be saved")
        self.writer = SaveEngine(self._run_dir(args), rules, takeover=True)
        self.writer.triggers = self._triggers
        if not state.is_world_process_zero:
            return
        run = self.writer.open()
        if state.global_step > 0:
            self._note_resume(state.global_step)
        log.info(
            "%s Trainer checkpoints %s %s",
            "recording" if self._records(args) else "committing",
            "in" if self._records(args) else "into",
            run.path,
        )

    def _note_resume(self, step: int) -> None:
        """Training resumed at `step`: protect that checkpoint and restore the triggers' state."""
        assert self.writer is not None and self.writer.run is not None
        at_step = [c for c in self.writer.run.checkpoints(kind="train") if c.step == step]
        if not at_step:
            return
        info = max(at_step, key=lambda c: c.seq)
        self.writer.resumed_from = info.name
        self.writer.last_saved = info
        saved = info.extra.get("triggers")
        if isinstance(saved, Mapping):
            self.writer.load_state_dict(saved)

    def _ask(self, kind: str, state: Any, control: Any, metrics: Mapping[str, Any]) -> None:
        if self.writer is None or not self.writer.triggers:
            return
        values = encode_metrics(metrics, lenient=True)
        reason = self.writer.poll(kind, state.global_step, epoch_index(state.epoch), values)
        fired = reason is not None
        if not self._deterministic:
            fired = _agree(fired)
        if fired:
            control.should_save = True
            self._reason = reason or "a trigger on the main process"

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._ask("step", state, control, {})

    def on_log(
        self, args: Any, state: Any, control: Any, logs: Mapping[str, Any] | None = None, **kwargs: Any
    ) -> None:
        # Triggers on training metrics ("loss"); the step's save comes after its logging.
        if logs:
            self._ask("step", state, control, logs)

    def on_evaluate(
        self, args: Any, state: Any, control: Any, metrics: Mapping[str, Any] | None = None, **kwargs: Any
    ) -> None:
        if metrics:
            if self.writer is not None:
                self.writer.note_evaluation(metrics)
            self._ask("step", state, control, metrics)

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._ask("epoch", state, control, {})

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not state.is_world_process_zero or self.writer is None:
            return
        reason, self._reason = self._reason or "the Trainer's save_strategy", ""
        step = state.global_step
        folder = os.path.join(os.fspath(args.output_dir), f"{CHECKPOINT_PREFIX}{step}")
        if not os.path.isdir(folder):
            log.warning(
                "%s: not found after the Trainer's save (hyper-parameter search?); not recorded", folder
            )
            return
        if state.best_model_checkpoint:
            self.writer.protected = {os.path.basename(os.fspath(state.best_model_checkpoint))}
        metrics = metrics_at(state.log_history, step)
        extra = {
            "framework": "transformers",
            "epoch_float": state.epoch,
            "triggers": self.writer.state_dict(),
        }
        epoch = epoch_index(state.epoch)
        if self._records(args):
            self.writer.record(
                os.path.basename(folder), step=step, epoch=epoch, metrics=metrics, trigger=reason, extra=extra
            )
            return
        files = []
        for name in sorted(os.listdir(folder)):
            path = os.path.join(folder, name)
            if os.path.isdir(path):
                raise ConfigError(
                    f"{path}: a sub-folder in a Trainer checkpoint (DeepSpeed/FSDP shards) cannot be "
                    "committed file by file; use LadleCallback() without run_dir to record in place"
                )
            files.append((name, _copier(path)))
        run = self.writer.open()
        self.writer.save(
            SaveRequest(
                name=run.free_name(os.path.basename(folder)),
                files=files,
                step=step,
                epoch=epoch,
                metrics=encode_metrics(metrics, lenient=True),
                trigger=reason,
                extra=extra,
                # The Trainer may rotate or rewrite its folder once this returns: copy it now.
                write_at_call=True,
            ),
            background=self.async_save,
        )

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.writer is not None:
            self.writer.wait()  # the check and the soup below see every checkpoint
            self.writer.warn_if_monitor_unrecorded()
        plan = self.soup_plan
        if plan.recipe is None:
            self._close()
            return
        soup_dir = os.path.abspath(os.fspath(plan.output or os.path.join(args.output_dir, SOUP_FOLDER)))
        weights_path = os.path.join(soup_dir, WEIGHTS_FILE)
        try:
            if state.is_world_process_zero and self.writer is not None:
                run = self.writer.open()
                newest = run.latest(kind="train")
                if newest is None:
                    raise ConfigError(f"{run.path}: no checkpoint was saved, so there is nothing to average")
                os.makedirs(soup_dir, exist_ok=True)
                self.soup_result = soup_to_file(run, plan, weights_path)
                copy_model_files(newest.path, soup_dir)
                self.soup_dir = soup_dir
        finally:
            self._close()
        _barrier()  # the other processes load what the main one wrote
        if plan.load:
            model = kwargs.get("model")
            if model is None:
                raise ConfigError("load_soup=True: the Trainer passed no model to the callback")
            if self.soup_result is not None:
                weights = soup_weights(self.soup_result)
            else:
                from safetensors.torch import load_file

                weights = load_file(weights_path)
            load_into(model, weights, where=weights_path)
            log.info("loaded the soup %s into the model", weights_path)

    def _close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _copier(source: str) -> Any:
    def copy(destination: str) -> None:
        shutil.copyfile(source, destination)

    return copy


def load_into(model: torch.nn.Module, weights: Mapping[str, torch.Tensor], *, where: str) -> None:
    """Load `weights` saved by `save_pretrained` into `model`, in place, after checking they fit.

    `save_pretrained` stores tied weights once (GPT-2's `lm_head.weight` is the
    input embedding), so a key may be missing when the model ties it to one that
    is present; anything else missing or unexpected, or a shape that differs, is
    a StateMismatch naming it, raised before the model is touched.
    """
    live = model.state_dict()
    present = {live[k].data_ptr() for k in weights if k in live}
    missing = sorted(k for k in set(live) - set(weights) if live[k].data_ptr() not in present)
    unexpected = sorted(set(weights) - set(live))
    shapes = sorted(
        f"{k} {list(weights[k].shape)} vs {list(live[k].shape)}"
        for k in set(weights) & set(live)
        if weights[k].shape != live[k].shape
    )
    problems = [
        f"{label} {items[:5]}"
        for label, items in (("missing", missing), ("unexpected", unexpected), ("shapes differ:", shapes))
        if items
    ]
    if problems:
        raise StateMismatch(
            f"{where}: the soup does not fit the model ({'; '.join(problems)}); "
            "load it with AutoModel*.from_pretrained(<soup folder>) instead"
        )
    model.load_state_dict(dict(weights), strict=False)


__all__ = ["LadleCallback", "MissingDependency", "load_into"]
