"""`ladle avg INPUT... -o OUT`: average checkpoint files, folders, globs or runs."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Annotated

import typer
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from ladle.averaging.int_policies import IntPolicy
from ladle.averaging.output_layouts import average_to_output
from ladle.cli.app import app, console, err_console, fail, print_json
from ladle.cli.display import examples
from ladle.formats import OutputFormat

EXAMPLE = examples(
    "ladle avg runs/exp1/step-* -o soup.safetensors",
    "ladle avg runs/exp1@best runs/exp1@latest -o two.safetensors",
    "ladle avg a.pt b.pt c.pt -o avg.pt --key model --strip-prefix module.",
    "ladle avg ckpts/ -o avg.safetensors --weights 0.5,0.3,0.2 --dtype bf16",
)


@contextmanager
def progress_bar(description: str) -> Iterator[Callable[[int], None]]:
    """A byte-counting progress bar on stderr (silent when stderr is not a terminal)."""
    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(binary_units=True),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=err_console,
        transient=True,
        disable=not err_console.is_terminal,
    )
    task = bar.add_task(description, total=None)
    seen = {"total": 0}

    def advance(nbytes: int) -> None:
        seen["total"] += nbytes
        bar.update(task, completed=seen["total"])

    with bar:
        yield advance


@app.command("avg", epilog=EXAMPLE)
def avg_command(
    inputs: Annotated[
        list[str],
        typer.Argument(
            metavar="INPUT...",
            help="Checkpoints: .safetensors, .pt/.pth/.bin/.ckpt, model or checkpoint folders, "
            "folders of checkpoint files, globs, runs (every checkpoint), a checkpoint of a run "
            "(RUN/best, RUN@1200, ...), or a "
            "transformers Trainer output_dir (its checkpoint-* folders).",
            show_default=False,
        ),
    ],
    output: Annotated[
        str,
        typer.Option(
            "-o",
            "--output",
            help="Output file or URL (.safetensors, or .pt for torch format); for model folders "
            "(save_pretrained, Trainer checkpoint-*) a folder that from_pretrained loads.",
        ),
    ],
    weights: Annotated[
        str | None,
        typer.Option(
            "--weights",
            help="uniform (default), numbers like 0.5,0.3,0.2, softmax:METRIC:min|max[:T], "
            "recency:HALF_LIFE.",
        ),
    ] = None,
    dtype: Annotated[
        str | None, typer.Option("--dtype", help="Output dtype of float tensors (default: the members').")
    ] = None,
    accumulate: Annotated[
        str, typer.Option("--accumulate", help="Accumulator dtype: float32 or float64.")
    ] = "float32",
    int_policy: Annotated[
        IntPolicy,
        typer.Option("--int-policy", help="Integer/bool tensors: newest, first, floor-mean or error."),
    ] = IntPolicy.NEWEST,
    key: Annotated[
        str | None,
        typer.Option("--key", help="Where the weights are: 'ema' in ladle checkpoints, a key in pickles."),
    ] = None,
    ema: Annotated[
        bool,
        typer.Option("--ema", help="Average the EMA weights (ema.safetensors, timm's state_dict_ema, ...)."),
    ] = False,
    strip_prefix: Annotated[
        list[str] | None,
        typer.Option("--strip-prefix", help="Remove this key prefix (repeatable; 'auto' for the usual)."),
    ] = None,
    fmt: Annotated[
        OutputFormat | None,
        typer.Option("--format", help="Output format (default: from the output name, else safetensors)."),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output.")] = False,
    intersect: Annotated[
        bool, typer.Option("--intersect", help="Average only the keys every member has.")
    ] = False,
    trust: Annotated[
        bool, typer.Option("--trust", help="Allow full unpickling (runs code from the files).")
    ] = False,
    keep_duplicates: Annotated[
        bool,
        typer.Option(
            "--keep-duplicates",
            help="Count a file named twice (or hard-linked) twice, and files of one folder with the "
            "same weights (Lightning's last.ckpt) each.",
        ),
    ] = False,
    hash_files: Annotated[
        bool,
        typer.Option(
            "--hash/--no-hash",
            help="Hash each input as it is read; refuse one that differs from its meta.json.",
        ),
    ] = True,
    skip_corrupt: Annotated[
        bool,
        typer.Option("--skip-corrupt", help="Leave out (with a warning) inputs that fail their checksum."),
    ] = False,
    keep_structure: Annotated[
        bool,
        typer.Option(
            "--keep-structure",
            help="Write the newest member's whole checkpoint (fairseq, timm, ...) with its weights "
            "replaced by the average, so the tool that made it loads the output (torch format).",
        ),
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the provenance as JSON.")] = False,
) -> None:
    """Average checkpoints into one model, one tensor at a time.

    Floats accumulate in float32 (bf16/fp16 members are rounded once); integer
    tensors follow --int-policy; tied weights stay tied. Each input is hashed
    while it is read; one whose bytes differ from the checksum in its meta.json
    is refused (--skip-corrupt leaves it out). The output is written atomically
    with its provenance (recipe, members, checksums of the bytes read, weights) in
    the safetensors metadata and OUT.json.
    """
    if ema and key not in (None, "ema"):
        fail(f"--ema and --key {key} ask for different weights; give one of them")
    key = "ema" if ema else key
    with progress_bar("averaging") as advance:
        result = average_to_output(
            inputs,
            output,
            structure="members" if keep_structure else "file",
            weights=weights,
            dtype=dtype,
            accumulate=accumulate,
            int_policy=int_policy,
            intersect=intersect,
            key=key,
            strip_prefix=strip_prefix or (),
            trust=trust,
            dedupe=not keep_duplicates,
            hash_files=hash_files,
            skip_corrupt=skip_corrupt,
            format=fmt,
            force=force,
            progress=advance,
        )
    if as_json:
        print_json({"output": result.path, "sidecar": result.sidecar, **result.provenance})
        return
    record = result.provenance
    console.print(
        f"averaged {len(record['members'])} checkpoint{'s' if len(record['members']) != 1 else ''} "
        f"into {result.path} "
        f"({record['keys']} tensors, dtype {record['dtype']}, weights {record['weighting']})",
        highlight=False,
        soft_wrap=True,
    )
