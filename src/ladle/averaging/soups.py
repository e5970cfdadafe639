"""Checkpoint soups: a recipe picks a run's checkpoints, the engine averages them.

    result = ladle.soup("runs/exp1", "last:5", output="soup.safetensors")
    result = ladle.soup(run, "top:3:val_loss:min", window="epoch:13-50")
    result = ladle.soup(run, "greedy:val_acc:max", evaluate=evaluate, model=make_model)
    result = ladle.soup(run, "improved:loss:min,auc:max", into_run=True)   # a new checkpoint

Recipes are described in `ladle.recipes`, weights in `ladle.weights`. Without
`output` or `into_run` the soup stays in memory (`result.state_dict`).

`run` may also be a transformers Trainer output directory that is not a ladle
run (`checkpoint-<step>/` folders with `trainer_state.json`): its checkpoints
and their metrics come from `trainer_state.json`, and an `output` without a
weights suffix is a folder that `from_pretrained` loads (`model.safetensors`
plus the newest member's config and tokenizer files).

Keeping a soup up to date during training: `RunningSoup(recipe, output)`;
call `running.update(run)` after each committed checkpoint (the
CheckpointManager does when given `running_soup=`). It recomputes the soup
only when the recipe's selection (or a member's file) changed, writes
`output` atomically each time, and returns the new `SoupResult` (None when
nothing changed or nothing is selected yet). Errors are raised, not
swallowed.

Greedy soups (Wortsman et al. 2022, "Model soups"): every candidate is scored
on its own with `evaluate` (or by its recorded metric with `rank="recorded"`),
the best starts the soup, and each next candidate, best first, joins only if
the soup's score with it does not get worse. The running sum stays in memory,
so each candidate is read once; each step is logged and returned in
`result.greedy`.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import logging
import math
import os
import re
import shutil
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from ladle.averaging.engine import (
    PROVENANCE_KEY,
    AverageOptions,
    IntPolicy,
    Progress,
    RunningAverage,
    average_members,
    build_plan,
    provenance,
    read_provenance,
    warn_batchnorm,
    write_average,
)
from ladle.averaging.members import Member, close_members, is_run_dir, member_from_source, open_members
from ladle.averaging.recipes import Greedy, Recipe, Top, Window, parse_recipe
from ladle.averaging.weights import Uniform, Weighting, WeightsLike, parse_weights
from ladle.errors import ConfigError, EmptySelection, OutputExists
from ladle.formats import load_source, save_tensors, sidecar_path
from ladle.formats.load import ladle_weights_file
from ladle.formats.write import (
    OutputFormat,
    check_destination,
    output_format,
    write_json,
    write_safetensors,
)
from ladle.metrics import Mode, is_finite_number
from ladle.store.run import CheckpointInfo, Run
from ladle.store.trainer_dirs import TrainerOutput, copy_model_files, is_trainer_output

log = logging.getLogger("ladle")

Evaluate = Callable[[Any], "Mapping[str, Any] | float"]
"""evaluate(model or state dict) -> a metrics mapping (or one number) on held-out data."""
ModelLike = nn.Module | Callable[[], nn.Module]


@dataclass(kw_only=True)
class GreedyStep:
    """One step of a greedy search."""

    name: str
    """The candidate checkpoint."""
    step: int
    """Its training step."""
    score: float
    """Its own held-out score."""
    soup_score: float
    """The soup's score with the candidate added."""
    accepted: bool
    """Whether it joined the soup (the score did not get worse)."""
    size: int
    """Members in the soup after this step."""


@dataclass(kw_only=True)
class SoupResult:
    """What `soup` chose, how it weighted it, and where the soup went."""

    recipe: str
    """The recipe, in canonical form."""
    members: list[CheckpointInfo]
    """The checkpoints averaged, oldest first."""
    weights: list[float]
    """Their normalized weights, in the same order."""
    provenance: dict[str, Any]
    """The record stored with the soup."""
    path: str | None = None
    """The output file, when one was written."""
    folder: str | None = None
    """The `from_pretrained` folder holding `path`, for a soup of a Trainer output directory."""
    checkpoint: CheckpointInfo | None = None
    """The new checkpoint, with `into_run=True`."""
    state_dict: dict[str, torch.Tensor] | None = None
    """The averaged weights, when the soup was kept in memory (no output, or greedy)."""
    greedy: list[GreedyStep] = field(default_factory=list)
    """Every step of a greedy search."""
    score: float | None = None
    """The greedy soup's held-out score."""


RunLike = Run | TrainerOutput
"""What soups choose from: a ladle run, or a Trainer output directory read as one."""


def _open_run(run: Run | TrainerOutput | str | os.PathLike[str]) -> RunLike:
    if isinstance(run, Run | TrainerOutput):
        return run
    text = os.fspath(run)
    if is_trainer_output(text) and not is_run_dir(text):
        return TrainerOutput(text)
    return Run(run)


def _has_weights(info: CheckpointInfo, key: str | None) -> bool:
    # `<key>.safetensors`; for the model, also transformers' names (a recorded Trainer folder's shards).
    return ladle_weights_file(info.files, key) is not None


def candidates(run: RunLike, key: str | None) -> list[CheckpointInfo]:
    """The run's training checkpoints that hold the weights file `key` asks for."""
    history = run.checkpoints(kind="train")
    if isinstance(run, TrainerOutput):
        return history  # every listed Trainer checkpoint holds model weights
    usable = [c for c in history if _has_weights(c, key)]
    if len(usable) < len(history):
        log.warning(
            "%s: %d of %d checkpoints have no %s; leaving them out",
            run.path,
            len(history) - len(usable),
            len(history),
            f"{key or 'model'}.safetensors",
        )
    return usable


def select(
    run: RunLike | str | os.PathLike[str],
    recipe: str | Recipe,
    *,
    window: str | Window | None = None,
    key: str | None = None,
) -> tuple[Recipe, list[CheckpointInfo]]:
    """The recipe (monitor filled in) and the checkpoints it picks, reading no weights."""
    the_run = _open_run(run)
    parsed = parse_recipe(recipe, window)
    if isinstance(parsed.select, Top):
        parsed = Recipe(select=parsed.select.resolved(the_run.monitor), window=parsed.window)
    history = candidates(the_run, key)
    chosen = parsed.choose(history)
    if not chosen:
        raise EmptySelection(
            f"{the_run.path}: recipe {parsed} selects none of the {len(history)} checkpoints; "
            "widen the window or change the recipe"
        )
    return parsed, chosen


@dataclass(frozen=True)
class _Weighed:
    label: str
    step: int | None
    metrics: dict[str, Any]


def weights_for(chosen: Sequence[CheckpointInfo], weights: WeightsLike) -> tuple[Weighting, list[float]]:
    """The weighting and normalized weights of chosen checkpoints, reading no tensors."""
    weighting = parse_weights(weights)
    return weighting, weighting([_Weighed(c.path, c.step, c.metrics) for c in chosen])


def _open(chosen: Sequence[CheckpointInfo], key: str | None, *, hash_files: bool = False) -> list[Member]:
    members: list[Member] = []
    try:
        for info in chosen:
            member = member_from_source(load_source(info.path, key=key), label=info.path)
            # The run's record names the checkpoint (a Trainer folder's own metadata does not).
            member.name, member.step, member.epoch = info.name, info.step, info.epoch
            member.metrics = dict(info.metrics)
            members.append(member)
        if hash_files:
            members = open_members(members, dedupe=False, hash_files=True)
    except BaseException:
        close_members(members)
        raise
    return members


def _origin(run: RunLike) -> dict[str, str]:
    return {"trainer_output": run.path} if isinstance(run, TrainerOutput) else {"run": run.path}


def _folder_output(run: RunLike, output: str | os.PathLike[str] | None) -> bool:
    """Whether `output` names a `from_pretrained` folder: for a Trainer output directory, an
    existing folder or a name without a weights file suffix."""
    if output is None or not isinstance(run, TrainerOutput):
        return False
    text = os.fspath(output)
    return os.path.isdir(text) or not text.lower().endswith((".safetensors", *_TORCH_NAMES))


_TORCH_NAMES = (".pt", ".pth", ".bin", ".ckpt", ".tar")


def _weights_name(format: str | None) -> str:
    """transformers' file name for the soup's weights in a `from_pretrained` folder."""
    torch_format = format is not None and OutputFormat(format) is OutputFormat.TORCH
    return "pytorch_model.bin" if torch_format else "model.safetensors"


def _slug(recipe: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+=-]+", "-", recipe).strip("-.")[:80] or "soup"


def soup(
    run: RunLike | str | os.PathLike[str],
    recipe: str | Recipe = "uniform",
    *,
    output: str | os.PathLike[str] | None = None,
    window: str | Window | None = None,
    weights: WeightsLike = "uniform",
    evaluate: Evaluate | None = None,
    model: ModelLike | None = None,
    rank: str = "evaluate",
    key: str | None = None,
    dtype: str | torch.dtype | None = None,
    accumulate: str | torch.dtype = "float32",
    int_policy: IntPolicy | str = IntPolicy.NEWEST,
    intersect: bool = False,
    format: str | None = None,
    force: bool = False,
    into_run: bool = False,
    name: str | None = None,
    progress: Progress | None = None,
) -> SoupResult:
    """Average a run's checkpoints chosen by `recipe`.

    `output`: write the soup there (safetensors unless a `.pt` name or
    `format="torch"`), with provenance in its metadata and `<output>.json`.
    `into_run`: also commit it into the run as a pinned checkpoint of kind
    "soup" (named `name`, or `soup-<recipe>-<step>`), so training can continue
    from it (`manager.resume("<name>")`). With neither, the soup is returned in
    `result.state_dict`. `key` picks the weights file of each checkpoint
    (`"ema"` averages the EMA weights). Greedy recipes need `evaluate`
    (called with the model built by `model`, loaded with the soup, or with the
    state dict when no model is given).

    `run` may be a transformers Trainer output directory that is not a ladle
    run: recipes choose among its `checkpoint-<step>/` folders with the metrics
    of their `trainer_state.json`, and an `output` without a weights suffix
    (`.safetensors`, `.pt`, ...) is a folder that `from_pretrained` loads:
    `model.safetensors` (`pytorch_model.bin` with `format="torch"`), its
    provenance, and the newest member's config and tokenizer files
    (`result.folder`). `into_run` needs a ladle run.
    """
    the_run = _open_run(run)
    if into_run and isinstance(the_run, TrainerOutput):
        raise ConfigError(
            f"{the_run.path}: a Trainer output directory, not a ladle run, so into_run (--into-run) "
            "has nowhere to commit; write the soup with output= (-o), or record training with LadleCallback()"
        )
    options = AverageOptions(
        dtype=dtype,  # type: ignore[arg-type]
        accumulate=accumulate,  # type: ignore[arg-type]
        int_policy=int_policy,  # type: ignore[arg-type]
        intersect=intersect,
    )
    parsed = parse_recipe(recipe, window)
    if parsed.select.needs_evaluate and evaluate is None:
        raise ConfigError(f"recipe {parsed} needs evaluate= (--eval module:function) to score each soup")
    folder: str | None = None
    if _folder_output(the_run, output):
        assert output is not None
        output_format("model", format)
        folder = os.path.abspath(os.fspath(output))
        if os.path.lexists(folder) and not os.path.isdir(folder):
            raise OutputExists(f"{folder}: exists and is not a folder; name a folder for the soup")
        output = os.path.join(folder, _weights_name(format))
    if output is not None:
        output_format(output, format)
        if folder is None or os.path.isdir(folder):
            check_destination(output, force=force)
            check_destination(sidecar_path(os.path.abspath(os.fspath(output))), force=force)
    parsed, chosen = select(the_run, parsed, key=key)
    made_folder = folder is not None and not os.path.isdir(folder)
    if folder is not None:
        os.makedirs(folder, exist_ok=True)
    try:
        result = _soup_of(
            the_run,
            parsed,
            chosen,
            options,
            weights=weights,
            evaluate=evaluate,
            model=model,
            rank=rank,
            key=key,
            output=output,
            format=format,
            force=force,
            into_run=into_run,
            name=name,
            progress=progress,
        )
    except BaseException:
        if made_folder and folder is not None:
            with contextlib.suppress(OSError):
                os.rmdir(folder)  # only when still empty
        raise
    if folder is not None:
        copy_model_files(_newest(result).path, folder)
        result.folder = folder
    return result


def _soup_of(
    the_run: RunLike,
    parsed: Recipe,
    chosen: list[CheckpointInfo],
    options: AverageOptions,
    *,
    weights: WeightsLike,
    evaluate: Evaluate | None,
    model: ModelLike | None,
    rank: str,
    key: str | None,
    output: str | os.PathLike[str] | None,
    format: str | None,
    force: bool,
    into_run: bool,
    name: str | None,
    progress: Progress | None,
) -> SoupResult:
    members = _open(chosen, key, hash_files=isinstance(the_run, TrainerOutput))
    try:
        if isinstance(parsed.select, Greedy):
            if not isinstance(parse_weights(weights), Uniform):
                raise ConfigError("greedy soups are uniform averages of what they accept; drop weights=")
            assert evaluate is not None
            return _greedy(
                the_run,
                parsed,
                chosen,
                members,
                options,
                evaluate=evaluate,
                model=model,
                rank=rank,
                output=output,
                format=format,
                force=force,
                into_run=into_run,
                name=name,
            )
        return _plain(
            the_run,
            parsed,
            chosen,
            members,
            options,
            weights=weights,
            output=output,
            format=format,
            force=force,
            into_run=into_run,
            name=name,
            progress=progress,
        )
    finally:
        close_members(members)


def _plain(
    run: RunLike,
    recipe: Recipe,
    chosen: list[CheckpointInfo],
    members: list[Member],
    options: AverageOptions,
    *,
    weights: WeightsLike,
    output: str | os.PathLike[str] | None,
    format: str | None,
    force: bool,
    into_run: bool,
    name: str | None,
    progress: Progress | None,
) -> SoupResult:
    text = str(recipe)
    weighting = parse_weights(weights)
    extra = _origin(run)
    if output is not None:
        written = write_average(
            members,
            output,
            weights=weighting,
            options=options,
            format=format,
            force=force,
            recipe=text,
            extra=extra,
            progress=progress,
        )
        result = SoupResult(
            recipe=text,
            members=chosen,
            weights=written.weights,
            provenance=written.provenance,
            path=written.path,
        )
        if into_run:
            result.checkpoint = _commit_file(run, written.path, result, name)
        return result
    state, plan, normalized = average_members(members, weights=weighting, options=options, progress=progress)
    record = provenance(
        members, normalized, plan, options, recipe=text, weighting=str(weighting), extra=extra
    )
    result = SoupResult(recipe=text, members=chosen, weights=normalized, provenance=record, state_dict=state)
    if into_run:
        result.checkpoint = _commit_state(run, state, result, name)
    return result


# -- greedy ------------------------------------------------------------------------------------------


def _score(result: Any, metric: str) -> float:
    if isinstance(result, Mapping):
        if metric not in result:
            raise ConfigError(
                f"evaluate returned {sorted(result)} without {metric!r}; return a dict holding it"
            )
        result = result[metric]
    if hasattr(result, "item"):
        result = result.item()
    if isinstance(result, bool) or not isinstance(result, int | float):
        raise ConfigError(f"evaluate returned {type(result).__name__} for {metric!r}; return a number")
    return float(result)


def _better_or_equal(new: float, old: float, mode: Mode) -> bool:
    if not math.isfinite(new):
        return False
    return new >= old if mode is Mode.MAX else new <= old


def _rank_value(score: float, mode: Mode) -> float:
    if not math.isfinite(score):
        return math.inf
    return -score if mode is Mode.MAX else score


class _Scorer:
    """Runs the user's evaluate on a state dict, through their model when they gave one."""

    def __init__(self, evaluate: Evaluate, model: ModelLike | None, metric: str) -> None:
        self.evaluate = evaluate
        self.metric = metric
        self.model: nn.Module | None = None
        if isinstance(model, nn.Module):
            self.model = model
        elif model is not None:
            built = model()
            if not isinstance(built, nn.Module):
                raise ConfigError(f"model factory returned {type(built).__name__}, not an nn.Module")
            self.model = built

    def __call__(self, state: Mapping[str, torch.Tensor]) -> float:
        # Scoring never needs gradients; no_grad keeps evaluation memory at inference size.
        with torch.no_grad():
            if self.model is None:
                return _score(self.evaluate(dict(state)), self.metric)
            from ladle.state.model_weights import load_model_weights

            load_model_weights(self.model, state, strict=True)
            return _score(self.evaluate(self.model), self.metric)


def _greedy(
    run: RunLike,
    recipe: Recipe,
    chosen: list[CheckpointInfo],
    members: list[Member],
    options: AverageOptions,
    *,
    evaluate: Evaluate,
    model: ModelLike | None,
    rank: str,
    output: str | os.PathLike[str] | None,
    format: str | None,
    force: bool,
    into_run: bool,
    name: str | None,
) -> SoupResult:
    greedy = recipe.select
    assert isinstance(greedy, Greedy)
    if rank not in ("evaluate", "recorded"):
        raise ConfigError(f"rank={rank!r} is not known; use 'evaluate' or 'recorded'")
    plan = build_plan(members, options)
    warn_batchnorm(plan)
    scorer = _Scorer(evaluate, model, greedy.metric)
    position = {info.name: i for i, info in enumerate(chosen)}

    # Individual scores: the held-out score of each candidate on its own.
    scores: dict[str, float] = {}
    for info, member in zip(chosen, members, strict=True):
        if rank == "recorded":
            value = info.metrics.get(greedy.metric)
            if not is_finite_number(value):
                raise ConfigError(
                    f"{info.path}: no finite recorded {greedy.metric!r}; use rank='evaluate' to score it"
                )
            scores[info.name] = float(value)  # type: ignore[arg-type]
        else:
            single = RunningAverage(plan, options)
            single.add(RunningAverage.load(member, plan), (info.step, position[info.name]))
            scores[info.name] = scorer(single.state())
            log.info("greedy: %s scores %s=%.6g on its own", info.name, greedy.metric, scores[info.name])
    order = sorted(chosen, key=lambda c: (_rank_value(scores[c.name], greedy.mode), -c.seq))
    if not math.isfinite(scores[order[0].name]):
        raise ConfigError(f"greedy: no candidate has a finite {greedy.metric!r}; check evaluate")

    soup_avg = RunningAverage(plan, options)
    steps: list[GreedyStep] = []
    accepted: list[CheckpointInfo] = []
    soup_score = -math.inf
    for info in order:
        member = members[position[info.name]]
        tensors = RunningAverage.load(member, plan)
        rank_key = (info.step, position[info.name])
        if not accepted:
            tried = soup_avg.state(tensors, rank_key)
            tried_score = scores[info.name] if rank == "evaluate" else scorer(tried)
            ok = True
        else:
            tried = soup_avg.state(tensors, rank_key)
            tried_score = scorer(tried)
            ok = _better_or_equal(tried_score, soup_score, greedy.mode)
        if ok:
            soup_avg.add(tensors, rank_key)
            accepted.append(info)
            soup_score = tried_score
        steps.append(
            GreedyStep(
                name=info.name,
                step=info.step,
                score=scores[info.name],
                soup_score=tried_score,
                accepted=ok,
                size=len(accepted),
            )
        )
        log.info(
            "greedy: %s %s (its own %s=%.6g, soup with it %.6g; soup has %d)",
            "adds" if ok else "skips",
            info.name,
            greedy.metric,
            scores[info.name],
            tried_score,
            len(accepted),
        )
        del tried, tensors
    state = soup_avg.state()
    accepted.sort(key=lambda c: (c.step, c.seq, c.name))
    accepted_members = [members[position[c.name]] for c in accepted]
    weights = [1.0 / len(accepted)] * len(accepted)
    record = provenance(
        accepted_members,
        weights,
        plan,
        options,
        recipe=str(recipe),
        weighting="uniform",
        extra={
            **_origin(run),
            "greedy": [asdict(s) for s in steps],
            "score": {greedy.metric: soup_score},
            "rank": rank,
        },
    )
    result = SoupResult(
        recipe=str(recipe),
        members=accepted,
        weights=weights,
        provenance=record,
        state_dict=state,
        greedy=steps,
        score=soup_score,
    )
    if output is not None:
        result.path = _save_state(state, output, record, format=format, force=force)
    if into_run:
        result.checkpoint = _commit_state(run, state, result, name, metrics={greedy.metric: soup_score})
    return result


# -- writing -----------------------------------------------------------------------------------------


def _metadata(record: Mapping[str, Any]) -> dict[str, str]:
    return {"format": "pt", PROVENANCE_KEY: json.dumps(record, default=str)}


def _save_state(
    state: Mapping[str, torch.Tensor],
    output: str | os.PathLike[str],
    record: Mapping[str, Any],
    *,
    format: str | None,
    force: bool,
) -> str:
    path = save_tensors(state, output, format=format, metadata=_metadata(record), force=force)
    write_json(sidecar_path(path), record, force=True)
    return path


def _newest(result: SoupResult) -> CheckpointInfo:
    return max(result.members, key=lambda c: (c.step, c.seq))


def _commit(
    run: RunLike,
    write: Callable[[str], None],
    result: SoupResult,
    name: str | None,
    metrics: Mapping[str, float] | None = None,
) -> CheckpointInfo:
    if not isinstance(run, Run):
        raise ConfigError(f"{run.path}: not a ladle run; a soup can be committed only into a run")
    newest = _newest(result)
    chosen_name = name or f"soup-{_slug(result.recipe)}-{newest.step:09d}"
    own_lock = not run.writable
    if own_lock:
        run.acquire()
    try:
        pending = run.begin(chosen_name)
        try:
            pending.write("model.safetensors", write)
        except BaseException:
            pending.abort()
            raise
        info = pending.commit(
            step=newest.step,
            epoch=newest.epoch,
            metrics=dict(metrics or {}),
            kind="soup",
            pinned=True,
            extra={"soup": result.provenance, "models": ["model"], "ema": False},
        )
    finally:
        if own_lock:
            run.release()
    log.info("committed the soup into %s as %s", run.path, info.name)
    return info


def _commit_state(
    run: RunLike,
    state: Mapping[str, torch.Tensor],
    result: SoupResult,
    name: str | None,
    metrics: Mapping[str, float] | None = None,
) -> CheckpointInfo:
    meta = _metadata(result.provenance)
    return _commit(run, lambda path: write_safetensors(path, state, metadata=meta), result, name, metrics)


def _commit_file(run: RunLike, path: str, result: SoupResult, name: str | None) -> CheckpointInfo:
    """Commit an already written soup: copied as safetensors (converted if it is torch format)."""
    if path.endswith(".safetensors"):
        return _commit(run, lambda dst: shutil.copyfile(path, dst), result, name)
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    return _commit_state(run, state, result, name)


# -- running soups -----------------------------------------------------------------------------------


class RunningSoup:
    """Keeps a soup file up to date as training goes: call `update(run)` after each commit.

    The soup is recomputed only when the recipe's selection changes (members
    or their files); the file is replaced atomically each time. An existing
    file is replaced only if it holds a soup of the same recipe (a resumed
    run) or `force=True`.
    """

    def __init__(
        self,
        recipe: str | Recipe,
        output: str | os.PathLike[str],
        *,
        window: str | Window | None = None,
        weights: WeightsLike = "uniform",
        key: str | None = None,
        dtype: str | torch.dtype | None = None,
        accumulate: str | torch.dtype = "float32",
        int_policy: IntPolicy | str = IntPolicy.NEWEST,
        evaluate: Evaluate | None = None,
        model: ModelLike | None = None,
        format: str | None = None,
        min_members: int = 1,
        force: bool = False,
    ) -> None:
        self.recipe = parse_recipe(recipe, window)
        self.output = os.path.abspath(os.fspath(output))
        output_format(self.output, format)
        if self.recipe.select.needs_evaluate and evaluate is None:
            raise ConfigError(f"running soup {self.recipe} needs evaluate=")
        if not isinstance(min_members, int) or min_members < 1:
            raise ConfigError(f"min_members={min_members!r} must be a whole number of at least 1")
        self.weights = parse_weights(weights)
        self.kwargs: dict[str, Any] = {
            "key": key,
            "dtype": dtype,
            "accumulate": accumulate,
            "int_policy": int_policy,
            "evaluate": evaluate,
            "model": model,
            "format": format,
        }
        self.min_members = min_members
        self.force = force
        self.last: SoupResult | None = None
        self._signature: tuple[Any, ...] | None = None
        self._checked_existing = False

    def _may_replace(self) -> None:
        if self._checked_existing or self.force or not os.path.exists(self.output):
            self._checked_existing = True
            return
        try:
            record = read_provenance(self.output)
        except Exception:  # an unreadable file is not ours to replace
            record = None
        if record is None or record.get("recipe") != str(self.recipe):
            raise OutputExists(
                f"{self.output}: exists and is not a running soup of {self.recipe}; "
                "pass force=True to replace it"
            )
        self._checked_existing = True

    def update(self, run: Run) -> SoupResult | None:
        """Recompute the soup if the selection changed; the new result, or None."""
        try:
            recipe, chosen = select(run, self.recipe, key=self.kwargs["key"])
        except EmptySelection:
            return None
        except ConfigError as exc:
            # top:K before the monitored metric is recorded: nothing to do yet.
            if isinstance(self.recipe.select, Top) and run.monitor is None:
                log.debug("running soup waits for a monitored metric: %s", exc)
                return None
            raise
        if len(chosen) < self.min_members:
            return None
        signature = (
            str(self.weights),
            *((c.name, tuple(sorted((n, f.sha256) for n, f in c.files.items()))) for c in chosen),
        )
        if signature == self._signature:
            return None
        self._may_replace()
        result = soup(run, recipe, output=self.output, weights=self.weights, force=True, **self.kwargs)
        self._signature = signature
        self.last = result
        log.info("running soup %s now averages %d checkpoints", recipe, len(result.members))
        return result


# -- loading user code for the CLI -----------------------------------------------------------------


def load_callable(spec: str, *, what: str) -> Callable[..., Any]:
    """`package.module:function` or `path/to/file.py:function` as a callable."""
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"{what} {spec!r}: write module:function or path/to/file.py:function")
    try:
        if module_name.endswith(".py") or os.sep in module_name:
            path = os.path.abspath(module_name)
            if not os.path.isfile(path):
                raise ConfigError(f"{what} {spec!r}: no file {path}")
            mod_name = f"ladle_user_{abs(hash(path))}"
            spec_obj = importlib.util.spec_from_file_location(mod_name, path)
            if spec_obj is None or spec_obj.loader is None:
                raise ConfigError(f"{what} {spec!r}: cannot import {path}")
            module = importlib.util.module_from_spec(spec_obj)
            sys.modules[mod_name] = module
            spec_obj.loader.exec_module(module)
        else:
            if os.getcwd() not in sys.path:
                sys.path.insert(0, os.getcwd())
            module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"{what} {spec!r}: cannot import {module_name} ({exc})") from None
    func = getattr(module, attr, None)
    if not callable(func):
        raise ConfigError(f"{what} {spec!r}: {module_name} has no function {attr!r}")
    return func  # type: ignore[no-any-return]


__all__ = [
    "GreedyStep",
    "RunLike",
    "RunningSoup",
    "SoupResult",
    "candidates",
    "load_callable",
    "select",
    "soup",
    "weights_for",
]
