"""Checkpoint soups: a recipe picks a run's checkpoints, the engine averages them.

    result = ladle.soup("runs/exp1", "last:5", output="soup.safetensors")
    result = ladle.soup(run, "top:3:val_loss:min", window="epoch:13-50")
    result = ladle.soup(run, "greedy:val_acc:max", evaluate=evaluate, model=make_model)
    result = ladle.soup(run, "improved:loss:min,auc:max", into_run=True)   # a new checkpoint

Recipes are described in `ladle.averaging.recipes`, weights in
`ladle.averaging.weights`, the greedy search in `ladle.averaging.greedy`, where
the soup goes in `ladle.averaging.soup_output`, and soups kept up to date
during training in `ladle.averaging.running_soup`. Without `output` or
`into_run` the soup stays in memory (`result.state_dict`). Every member is
verified while it is read: one whose bytes differ from the checksum its run
recorded is refused (`skip_corrupt=True` leaves it out with a warning).

`run` may also be another tool's output folder that is not a ladle run (a
transformers Trainer's `checkpoint-<step>/` folders with `trainer_state.json`,
Lightning, timm): its checkpoints and their metrics come from that tool's
records, and for a Trainer folder an `output` without a weights suffix is a
folder that `from_pretrained` loads (`model.safetensors` plus the newest
member's config and tokenizer files).

This module is one concept past ~400 lines: the `soup()` front door and its three ways of
making the soup from the chosen members (plain streaming average, greedy search, averaged
in memory then scored), which share the member opening, the provenance and the result;
everything else a soup needs lives in the modules named above.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch

from ladle.averaging.bn import RECALIBRATION_SEED
from ladle.averaging.engine import Progress
from ladle.averaging.front_doors import average_members, write_average
from ladle.averaging.greedy import Evaluate, GreedyStep, ModelLike, greedy_search
from ladle.averaging.int_policies import IntPolicy
from ladle.averaging.integrity import drop_corrupt, hash_members
from ladle.averaging.members import Member, close_members, member_from_source
from ladle.averaging.output_layouts import FOLDER_UPLOAD_LAST
from ladle.averaging.plan import AverageOptions, build_plan, warn_batchnorm
from ladle.averaging.provenance import provenance
from ladle.averaging.recipe_parsing import parse_recipe
from ladle.averaging.recipes import Greedy, Recipe, Window
from ladle.averaging.scoring import finish_soup
from ladle.averaging.selection import RunLike, open_run, select
from ladle.averaging.soup_output import (
    SoupOutput,
    commit_soup,
    file_writer,
    folder_weights_name,
    is_folder_output,
    newest_of,
    save_state,
    state_writer,
)
from ladle.averaging.weights import Uniform, WeightsLike, parse_weights
from ladle.errors import ConfigError, OutputExists
from ladle.formats import load_source
from ladle.formats.write import output_format, staged_folder_upload
from ladle.store.checkpoint import CheckpointInfo
from ladle.store.foreign_runs import TRANSFORMERS, ForeignRun
from ladle.store.storage import is_url
from ladle.store.trainer_dirs import copy_model_files

log = logging.getLogger("ladle")


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
    """The soup's held-out score when `evaluate` was given: the greedy recipe's metric, or the number
    evaluate returned for another recipe (None when it returned a mapping: see `metrics`)."""
    metrics: dict[str, float] = field(default_factory=dict)
    """Every number `evaluate` returned for the soup (per-example values as their mean)."""
    needs_bn_recalibration: bool = False
    """Whether the soup carries averaged BatchNorm statistics (two or more members, not recalibrated):
    run `ladle.recalibrate_bn(model, loader)` after loading it, or pass `recalibrate=`."""


def _open(chosen: Sequence[CheckpointInfo], key: str | None) -> list[Member]:
    members: list[Member] = []
    try:
        for info in chosen:
            member = member_from_source(load_source(info.path, key=key), label=info.path)
            # The run's record names the checkpoint (a Trainer folder's own metadata does not).
            member.name, member.step, member.epoch = info.name, info.step, info.epoch
            member.metrics = dict(info.metrics)
            members.append(member)
    except BaseException:
        close_members(members)
        raise
    return members


def _origin(run: RunLike) -> dict[str, str]:
    if isinstance(run, ForeignRun):
        if run.tool == TRANSFORMERS:
            return {"trainer_output": run.path}
        return {"output_dir": run.path, "tool": run.tool}
    return {"run": run.path}


@dataclass(kw_only=True)
class _Search:
    """A greedy search's inputs."""

    evaluate: Evaluate | None
    model: ModelLike | None
    rank: str
    recalibrate: Iterable[Any] | None = None


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
    recalibrate: Iterable[Any] | None = None,
    key: str | None = None,
    dtype: str | torch.dtype | None = None,
    accumulate: str | torch.dtype = "float32",
    int_policy: IntPolicy | str = IntPolicy.NEWEST,
    intersect: bool = False,
    format: str | None = None,
    force: bool = False,
    into_run: bool = False,
    name: str | None = None,
    skip_corrupt: bool = False,
    progress: Progress | None = None,
) -> SoupResult:
    """Average a run's checkpoints chosen by `recipe`.

    `output`: write the soup there, a path or URL (safetensors unless a `.pt` name or
    `format="torch"`), with provenance in its metadata and `<output>.json`.
    `into_run`: also commit it into the run as a pinned checkpoint of kind
    "soup" (named `name`, or `soup-<recipe>-<step>`), so training can continue
    from it (`manager.resume("<name>")`). With neither, the soup is returned in
    `result.state_dict`. `key` picks the weights file of each checkpoint
    (`"ema"` averages the EMA weights). Greedy recipes need `evaluate`
    (called with the model built by `model`, loaded with the soup, or with the
    state dict when no model is given); with any other recipe it scores the
    soup (`result.score`, `result.metrics`). `recalibrate` (training batches in
    a re-iterable loader, as `recalibrate_bn` takes them; needs `model`)
    re-estimates the BatchNorm statistics of every average of two or more
    members before it is scored, and the soup is written with them (see
    `ladle.averaging.scoring`). Each member is hashed as it is read
    and refused if its bytes differ from the checksum its run recorded
    (`skip_corrupt=True` leaves it out with a warning).

    `run` may be a transformers Trainer output directory that is not a ladle
    run: recipes choose among its `checkpoint-<step>/` folders with the metrics
    of their `trainer_state.json`, and an `output` without a weights suffix
    (`.safetensors`, `.pt`, ...) is a folder that `from_pretrained` loads:
    `model.safetensors` (`pytorch_model.bin` with `format="torch"`), its
    provenance, and the newest member's config and tokenizer files
    (`result.folder`). `into_run` needs a ladle run.
    """
    the_run = open_run(run)
    if into_run and isinstance(the_run, ForeignRun):
        raise ConfigError(
            f"{the_run.path}: a Trainer output directory, not a ladle run, so into_run (--into-run) "
            "has nowhere to commit; write the soup with output= (-o), or record training with LadleCallback()"
        )
    options = AverageOptions(dtype=dtype, accumulate=accumulate, int_policy=int_policy, intersect=intersect)
    parsed = parse_recipe(recipe, window)
    search: _Search | None = None
    if isinstance(parsed.select, Greedy):
        if evaluate is None:
            raise ConfigError(f"recipe {parsed} needs evaluate= (--eval module:function) to score each soup")
        if not isinstance(parse_weights(weights), Uniform):
            raise ConfigError("greedy soups are uniform averages of what they accept; drop weights=")
        search = _Search(evaluate=evaluate, model=model, rank=rank, recalibrate=recalibrate)
    elif evaluate is not None or recalibrate is not None:
        search = _Search(evaluate=evaluate, model=model, rank=rank, recalibrate=recalibrate)
    if recalibrate is not None and model is None:
        raise ConfigError(
            "recalibrate= needs model= (--model module:factory): BatchNorm statistics are re-estimated "
            "by running the model"
        )
    job = _SoupJob(
        run=the_run,
        recipe=parsed,
        options=options,
        weights=weights,
        search=search,
        key=key,
        format=format,
        force=force,
        into_run=into_run,
        name=name,
        skip_corrupt=skip_corrupt,
        progress=progress,
    )
    if is_folder_output(the_run, output) and is_url(os.fspath(output or "")):
        # A folder cannot be published in one request: it is built in a local folder, then
        # uploaded file by file, the weights last.
        url = os.fspath(output or "").rstrip("/")
        with staged_folder_upload(url, force=force, last=FOLDER_UPLOAD_LAST) as local:
            result = _make_soup(replace(job, force=True), local)
        result.folder = url
        result.path = f"{url}/{os.path.basename(result.path)}" if result.path else None
        return result
    return _make_soup(job, output)


@dataclass(frozen=True)
class _SoupJob:
    """What `soup()` was asked for, checked and resolved: everything but where it goes."""

    run: RunLike
    recipe: Recipe
    options: AverageOptions
    weights: WeightsLike
    search: _Search | None
    key: str | None
    format: str | None
    force: bool
    into_run: bool
    name: str | None
    skip_corrupt: bool
    progress: Progress | None


def _make_soup(job: _SoupJob, output: str | os.PathLike[str] | None) -> SoupResult:
    """Choose the members, average them into `output` (a file, a local folder, or nothing for
    a state dict in memory) and, for a folder, copy the newest member's model files beside it."""
    the_run, format = job.run, job.format
    folder: str | None = None
    if is_folder_output(the_run, output):
        assert output is not None
        output_format("model", format)
        folder = os.path.abspath(os.fspath(output))
        if os.path.lexists(folder) and not os.path.isdir(folder):
            raise OutputExists(f"{folder}: exists and is not a folder; name a folder for the soup")
        output = os.path.join(folder, folder_weights_name(format))
    out = SoupOutput(path=output, format=format, force=job.force, into_run=job.into_run, name=job.name)
    if folder is None or os.path.isdir(folder):
        out.check()
    parsed, chosen = select(the_run, job.recipe, key=job.key)
    made_folder = folder is not None and not os.path.isdir(folder)
    if folder is not None:
        os.makedirs(folder, exist_ok=True)
    members = _open(chosen, job.key)
    search, options, weights, skip = job.search, job.options, job.weights, job.skip_corrupt
    try:
        if search is not None and isinstance(parsed.select, Greedy):
            result = _greedy(the_run, parsed, chosen, members, options, out, search, skip)
        elif search is not None:
            result = _scored(the_run, parsed, chosen, members, options, out, weights, search, skip)
        else:
            result = _plain(the_run, parsed, chosen, members, options, out, weights, skip, job.progress)
    except BaseException:
        if made_folder and folder is not None:
            with contextlib.suppress(OSError):
                os.rmdir(folder)  # only when still empty
        raise
    finally:
        close_members(members)
    if folder is not None:
        copy_model_files(newest_of(result.members).path, folder)
        result.folder = folder
    return result


def _infos_of(
    used: Sequence[Member], members: Sequence[Member], chosen: Sequence[CheckpointInfo]
) -> list[CheckpointInfo]:
    """The checkpoints of the members used (corrupted ones may have been left out)."""
    ids = {id(m) for m in used}
    return [info for info, member in zip(chosen, members, strict=True) if id(member) in ids]


def _plain(
    run: RunLike,
    recipe: Recipe,
    chosen: list[CheckpointInfo],
    members: list[Member],
    options: AverageOptions,
    out: SoupOutput,
    weights: WeightsLike,
    skip_corrupt: bool,
    progress: Progress | None,
) -> SoupResult:
    text = str(recipe)
    weighting = parse_weights(weights)
    extra = _origin(run)
    if out.path is not None:
        written = write_average(
            members,
            out.path,
            weights=weighting,
            options=options,
            format=out.format,
            force=out.force,
            recipe=text,
            extra=extra,
            skip_corrupt=skip_corrupt,
            progress=progress,
        )
        used = _infos_of(written.members, members, chosen)
        result = SoupResult(
            recipe=text,
            members=used,
            weights=written.weights,
            provenance=written.provenance,
            path=written.path,
        )
        result.needs_bn_recalibration = bool(written.provenance.get("batchnorm_layers")) and len(used) > 1
        if out.into_run:
            write = file_writer(written.path, written.provenance)
            result.checkpoint = commit_soup(
                run, write, recipe=text, members=used, record=written.provenance, name=out.name
            )
        return result
    state, plan, normalized, used_members = average_members(
        members, weights=weighting, options=options, skip_corrupt=skip_corrupt, progress=progress
    )
    record = provenance(
        used_members, normalized, plan, options, recipe=text, weighting=str(weighting), extra=extra
    )
    used = _infos_of(used_members, members, chosen)
    result = SoupResult(recipe=text, members=used, weights=normalized, provenance=record, state_dict=state)
    result.needs_bn_recalibration = plan.batchnorm_layers > 0 and len(used) > 1
    if out.into_run:
        result.checkpoint = commit_soup(
            run, state_writer(state, record), recipe=text, members=used, record=record, name=out.name
        )
    return result


def _greedy(
    run: RunLike,
    recipe: Recipe,
    chosen: list[CheckpointInfo],
    members: list[Member],
    options: AverageOptions,
    out: SoupOutput,
    search: _Search,
    skip_corrupt: bool,
) -> SoupResult:
    greedy = recipe.select
    assert isinstance(greedy, Greedy)
    # The search reads each candidate whole, into memory: verify the files first.
    used_members = drop_corrupt(members, hash_members(members), skip=skip_corrupt)
    used = _infos_of(used_members, members, chosen)
    plan = build_plan(used_members, options)
    assert search.evaluate is not None
    found = greedy_search(
        greedy,
        used,
        used_members,
        plan,
        options,
        evaluate=search.evaluate,
        model=search.model,
        rank=search.rank,
        recalibrate=search.recalibrate,
    )
    averaged_statistics = plan.batchnorm_layers > 0 and len(found.accepted) > 1 and not found.recalibrated
    if averaged_statistics:
        warn_batchnorm(plan, len(found.accepted))
    weights = [1.0 / len(found.accepted)] * len(found.accepted)
    record = provenance(
        found.members,
        weights,
        plan,
        options,
        recipe=str(recipe),
        weighting="uniform",
        extra={
            **_origin(run),
            "greedy": [asdict(s) for s in found.steps],
            "score": {greedy.metric: found.score},
            "metrics": found.metrics,
            "rank": search.rank,
            **_recalibration_record(found.recalibrated),
        },
    )
    result = SoupResult(
        recipe=str(recipe),
        members=found.accepted,
        weights=weights,
        provenance=record,
        state_dict=found.state,
        greedy=found.steps,
        score=found.score,
        metrics=found.metrics,
        needs_bn_recalibration=averaged_statistics,
    )
    if out.path is not None:
        result.path = save_state(found.state, out, record)
    if out.into_run:
        result.checkpoint = commit_soup(
            run,
            state_writer(found.state, record),
            recipe=str(recipe),
            members=found.accepted,
            record=record,
            name=out.name,
            metrics={greedy.metric: found.score},
        )
    return result


def _recalibration_record(done: bool) -> dict[str, Any]:
    """What provenance says about the soup's BatchNorm statistics, when they were re-estimated."""
    return {"batchnorm": {"recalibrated": True, "seed": RECALIBRATION_SEED}} if done else {}


def _scored(
    run: RunLike,
    recipe: Recipe,
    chosen: list[CheckpointInfo],
    members: list[Member],
    options: AverageOptions,
    out: SoupOutput,
    weights: WeightsLike,
    search: _Search,
    skip_corrupt: bool,
) -> SoupResult:
    """A non-greedy soup made in memory, recalibrated and scored, then written."""
    text = str(recipe)
    weighting = parse_weights(weights)
    state, plan, normalized, used_members = average_members(
        members, weights=weighting, options=options, skip_corrupt=skip_corrupt, bn_warning=False
    )
    used = _infos_of(used_members, members, chosen)
    state, evaluation, recalibrated = finish_soup(
        state,
        members=len(used),
        batchnorm_layers=plan.batchnorm_layers,
        evaluate=search.evaluate,
        model=search.model,
        recalibrate=search.recalibrate,
    )
    averaged_statistics = plan.batchnorm_layers > 0 and len(used) > 1 and not recalibrated
    if averaged_statistics:
        warn_batchnorm(plan, len(used))
    score = None
    metrics: dict[str, float] = {}
    if evaluation is not None:
        metrics = dict(evaluation.metrics)
        score = None if math.isnan(evaluation.score) and metrics else evaluation.score
    extra: dict[str, Any] = {**_origin(run), **_recalibration_record(recalibrated)}
    if evaluation is not None:
        extra["metrics"] = metrics or {"score": score}
    record = provenance(
        used_members, normalized, plan, options, recipe=text, weighting=str(weighting), extra=extra
    )
    result = SoupResult(
        recipe=text,
        members=used,
        weights=normalized,
        provenance=record,
        state_dict=state,
        score=score,
        metrics=metrics,
        needs_bn_recalibration=averaged_statistics,
    )
    if out.path is not None:
        result.path = save_state(state, out, record)
    if out.into_run:
        result.checkpoint = commit_soup(
            run, state_writer(state, record), recipe=text, members=used, record=record, name=out.name
        )
    return result


__all__ = ["SoupResult", "soup"]
