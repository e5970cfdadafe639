"""`ladle soup RUN --recipe ...`: average a run's checkpoints chosen by a recipe."""

from __future__ import annotations

import os
from typing import Annotated, Any

import typer
from rich.table import Table

from ladle.averaging.int_policies import IntPolicy
from ladle.averaging.selection import select, weights_for
from ladle.averaging.soups import SoupResult, soup
from ladle.cli.app import app, console, fail, print_json
from ladle.cli.avg import progress_bar
from ladle.cli.display import examples, output_width, print_table
from ladle.formats import OutputFormat
from ladle.store.refs import is_run_dir
from ladle.store.trainer_dirs import is_trainer_output
from ladle.tools.model_factory import factory_for, resolve_callable

EXAMPLE = examples(
    "ladle soup runs/exp1 -o soup.safetensors --recipe last:5",
    "ladle soup runs/exp1 -o s.safetensors --recipe improved:f1,auc:max \\",
    "      --window epoch:13-50",
    "ladle soup runs/exp1 -o s.safetensors --recipe greedy:acc:max \\",
    "      --eval myproj.eval:evaluate --model myproj.model:build",
    "ladle soup trainer_out/ --recipe top:5:eval_loss:min -o trainer_out/soup",
    "ladle soup runs/exp1 --recipe top:3:val_loss:min --into-run --name soup-top3",
)


@app.command("soup", epilog=EXAMPLE)
def soup_command(
    run: Annotated[
        str,
        typer.Argument(
            metavar="RUN",
            help="The run folder, or a transformers Trainer output_dir (checkpoint-*/ folders).",
            show_default=False,
        ),
    ],
    recipe: Annotated[
        str,
        typer.Option(
            "--recipe",
            help="uniform, last:K, top:K:METRIC:min|max, improved:M1,M2:min|max[:over=previous], "
            "greedy:METRIC:min|max[:accept=no-worse|better|halves], window:epoch:A-B.",
        ),
    ] = "uniform",
    output: Annotated[
        str | None,
        typer.Option(
            "-o",
            "--output",
            help="Output file or URL (.safetensors, or .pt); for a Trainer output_dir a from_pretrained "
            "folder (default RUN/soup).",
        ),
    ] = None,
    window: Annotated[
        str | None, typer.Option("--window", help="Only checkpoints in epoch:A-B or step:A-B (inclusive).")
    ] = None,
    weights: Annotated[
        str | None,
        typer.Option(
            "--weights", help="uniform, 0.5,0.3,..., softmax:METRIC:min|max[:T], recency:HALF_LIFE."
        ),
    ] = None,
    evaluate: Annotated[
        str | None,
        typer.Option("--eval", help="module:function scoring a model (or state dict) on held-out data."),
    ] = None,
    model: Annotated[
        str | None, typer.Option("--model", help="module:factory building the model for --eval.")
    ] = None,
    rank: Annotated[
        str,
        typer.Option("--rank", help="Greedy order: 'evaluate' each candidate, or its 'recorded' metric."),
    ] = "evaluate",
    recalibrate: Annotated[
        str | None,
        typer.Option(
            "--recalibrate",
            help="module:function returning training batches: BatchNorm statistics of the soup are "
            "re-estimated on them (before each greedy evaluation) and written with it; needs --model.",
        ),
    ] = None,
    key: Annotated[
        str | None, typer.Option("--key", help="Which weights of each checkpoint: 'ema' for EMA weights.")
    ] = None,
    ema: Annotated[
        bool,
        typer.Option("--ema", help="Average the EMA weights (ema.safetensors, timm's state_dict_ema, ...)."),
    ] = False,
    dtype: Annotated[str | None, typer.Option("--dtype", help="Output dtype of float tensors.")] = None,
    accumulate: Annotated[
        str, typer.Option("--accumulate", help="Accumulator dtype: float32 or float64.")
    ] = "float32",
    int_policy: Annotated[
        IntPolicy,
        typer.Option("--int-policy", help="Integer/bool tensors: newest, first, floor-mean or error."),
    ] = IntPolicy.NEWEST,
    fmt: Annotated[OutputFormat | None, typer.Option("--format", help="Output format.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output.")] = False,
    into_run: Annotated[
        bool, typer.Option("--into-run", help="Also commit the soup into the run as a new checkpoint.")
    ] = False,
    name: Annotated[str | None, typer.Option("--name", help="Name of the checkpoint for --into-run.")] = None,
    skip_corrupt: Annotated[
        bool,
        typer.Option("--skip-corrupt", help="Leave out (with a warning) members that fail their checksum."),
    ] = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Show the chosen checkpoints and weights; write nothing.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """Average a run's checkpoints chosen by a recipe (a soup).

    Recipes pick the members (the newest, the best by a metric, those that
    improved, a greedy search on held-out data), --window narrows them by step
    or epoch, --weights weighs them. The soup goes to -o OUT (atomically, with
    its provenance), or into the run as a checkpoint with --into-run.

    RUN may also be a transformers Trainer output_dir made without ladle: the
    metrics come from each checkpoint's trainer_state.json, and the soup is a
    folder that from_pretrained loads (-o, default RUN/soup).
    """
    if name is not None and not into_run:
        fail("--name names the checkpoint that --into-run commits; add --into-run, or use -o OUT")
    if dry_run and (output is not None or into_run or force):
        flags = (("-o", output is not None), ("--into-run", into_run), ("--force", force))
        given = [flag for flag, on in flags if on]
        fail(f"--dry-run writes nothing, so {' and '.join(given)} would be ignored; drop one or the other")
    if ema and key not in (None, "ema"):
        fail(f"--ema and --key {key} ask for different weights; give one of them")
    key = "ema" if ema else key
    trainer_dir = is_trainer_output(run) and not is_run_dir(run)
    if output is None and not into_run and not dry_run:
        if not trainer_dir:
            fail("give -o OUT, --into-run, or --dry-run")
        output = os.path.join(run, "soup")
    if (model is not None) and evaluate is None and recalibrate is None:
        fail("--model is only used with --eval or --recalibrate")
    if recalibrate is not None and model is None:
        fail("--recalibrate needs --model module:factory (the statistics are re-estimated by running it)")
    if dry_run:
        _dry_run(run, recipe, window, weights, key, as_json)
        return
    evaluate_fn = resolve_callable(evaluate, flag="--eval") if evaluate else None
    factory = factory_for(model) if model else None
    batches = resolve_callable(recalibrate, flag="--recalibrate")() if recalibrate else None
    with progress_bar("soup") as advance:
        result = soup(
            run,
            recipe,
            output=output,
            window=window,
            weights=weights,
            evaluate=evaluate_fn,
            model=factory,
            rank=rank,
            recalibrate=batches,  # type: ignore[arg-type]
            key=key,
            dtype=dtype,
            accumulate=accumulate,
            int_policy=int_policy,
            format=fmt.value if fmt else None,
            force=force,
            into_run=into_run,
            name=name,
            skip_corrupt=skip_corrupt,
            progress=advance,
        )
    if as_json:
        print_json(_summary(result))
        return
    if result.greedy:
        _greedy_table(result)
    _members_table(
        result.recipe, [(m.name, m.step, m.epoch, m.metrics) for m in result.members], result.weights
    )
    written = result.folder or result.path
    where = [p for p in (written, result.checkpoint.path if result.checkpoint else None) if p]
    count = len(result.members)
    noun = "checkpoint" if count == 1 else "checkpoints"
    console.print(f"soup of {count} {noun} written to {' and '.join(where)}", highlight=False, soft_wrap=True)
    if result.metrics or result.score is not None:
        scores = result.metrics or {"score": result.score}
        shown = ", ".join(f"{k}={v:.6g}" for k, v in scores.items())
        console.print(f"held-out scores of the soup: {shown}", highlight=False, soft_wrap=True)
    if result.needs_bn_recalibration:
        console.print(
            "its BatchNorm statistics are averages: recalibrate after loading, or pass --recalibrate",
            style="yellow",
            highlight=False,
        )


def _summary(result: SoupResult) -> dict[str, Any]:
    return {
        "output": result.path,
        "folder": result.folder,
        "checkpoint": result.checkpoint.name if result.checkpoint else None,
        "score": result.score,
        "metrics": result.metrics,
        "needs_bn_recalibration": result.needs_bn_recalibration,
        **result.provenance,
    }


def _dry_run(
    run: str, recipe: str, window: str | None, weights: str | None, key: str | None, as_json: bool
) -> None:
    parsed, chosen = select(run, recipe, window=window, key=key)
    weighting, normalized = weights_for(chosen, weights)
    if as_json:
        print_json(
            {
                "recipe": str(parsed),
                "weighting": str(weighting),
                "members": [
                    {"name": c.name, "step": c.step, "epoch": c.epoch, "metrics": c.metrics, "weight": w}
                    for c, w in zip(chosen, normalized, strict=True)
                ],
            }
        )
        return
    _members_table(str(parsed), [(c.name, c.step, c.epoch, c.metrics) for c in chosen], normalized)


def _members_table(
    recipe: str, rows: list[tuple[str, int, int | None, dict[str, Any]]], weights: list[float]
) -> None:
    def cell(metrics: dict[str, Any], m: str) -> str:
        return f"{metrics[m]:.6g}" if isinstance(metrics.get(m), float) else str(metrics.get(m, ""))

    # Names, steps and weights are never cut; metrics the recipe names come first, and the
    # other metric columns are shown while they fit the width.
    names = sorted({k for _, _, _, metrics in rows for k in metrics})
    names = sorted(names, key=lambda m: m not in recipe)
    width = output_width(console)
    used = (
        sum(
            max(len(h), *(len(v) for v in col)) + 3
            for h, col in (
                ("checkpoint", [r[0] for r in rows]),
                ("step", [str(r[1]) for r in rows]),
                ("epoch", ["000"]),
                ("weight", ["0.0000"]),
            )
        )
        + 1
    )
    metric_names = []
    for m in names:
        need = max(len(m), *(len(cell(r[3], m)) for r in rows)) + 3
        if used + need <= width:
            metric_names.append(m)
            used += need
    table = Table(title=f"recipe {recipe}", title_justify="left")
    for column in ("checkpoint", "step", "epoch", *metric_names, "weight"):
        table.add_column(column, justify="left" if column == "checkpoint" else "right", no_wrap=True)
    for (name, step, epoch, metrics), weight in zip(rows, weights, strict=True):
        values = [cell(metrics, m) for m in metric_names]
        table.add_row(name, str(step), "" if epoch is None else str(epoch), *values, f"{weight:.4g}")
    print_table(console, table, squeeze=False)


def _greedy_table(result: SoupResult) -> None:
    table = Table(title="greedy search (best candidates first)", title_justify="left")
    for column in ("candidate", "step", "its score", "soup score", "joined", "soup size", "why"):
        table.add_column(column, justify="left" if column in ("candidate", "why") else "right")
    for s in result.greedy:
        table.add_row(
            s.name,
            str(s.step),
            f"{s.score:.6g}",
            f"{s.soup_score:.6g}",
            "yes" if s.accepted else "no",
            str(s.size),
            s.reason.partition(": ")[2] or s.reason,
        )
    console.print(table)
