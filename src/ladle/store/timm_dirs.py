"""timm `CheckpointSaver` output folders: `checkpoint-<epoch>.pth.tar` files and `summary.csv`.

timm keeps its newest checkpoints as `checkpoint-<epoch>.pth.tar` (`last.pth.tar` when
none are kept) and writes per-epoch metrics (`eval_top1`, `eval_loss`, ...) to
`summary.csv` beside them. timm records epochs only, so a timm checkpoint's step is its
epoch. Read without timm; `ladle.store.foreign_runs` presents the folder as a run.
"""

from __future__ import annotations

import csv
import io
import logging
import re

from ladle.store.checkpoint import CheckpointInfo, size_records
from ladle.store.paths import locate

log = logging.getLogger("ladle")

TIMM = "timm"
TIMM_SUMMARY = "summary.csv"
_TIMM_RE = re.compile(r"^checkpoint-(\d+)\.pth\.tar$")
_TIMM_LAST = ("last.pth.tar", "model_best.pth.tar")
# summary.csv columns that are counters or settings, not metrics.
_NOT_METRICS = frozenset({"epoch", "step", "lr"})


def is_timm_folder(names: list[str]) -> bool:
    """Whether a folder holding `names` is a timm output folder."""
    return TIMM_SUMMARY in names or any(_TIMM_RE.match(n) or n in _TIMM_LAST for n in names)


def read_timm_summary(folder: str) -> dict[int, dict[str, float]]:
    """Metrics by epoch from timm's `summary.csv` (`epoch,train_loss,eval_loss,eval_top1,...`) of a
    folder (path or URL)."""
    storage, where = locate(folder)
    path = storage.join(where, TIMM_SUMMARY)
    rows: dict[int, dict[str, float]] = {}
    try:
        text = storage.read_bytes(path).decode("utf-8")
        for row in csv.DictReader(io.StringIO(text, newline="")):
            try:
                epoch = int(float(row.get("epoch", "")))
            except ValueError:
                continue
            metrics = {}
            for key, value in row.items():
                if key is None or key in _NOT_METRICS:
                    continue
                try:
                    metrics[key] = float(value)
                except (TypeError, ValueError):
                    continue
            rows[epoch] = metrics
    except FileNotFoundError:
        return {}
    except (OSError, csv.Error, UnicodeDecodeError) as exc:
        log.warning("%s: unreadable (%s); timm checkpoints listed without metrics", path, exc)
    return rows


def timm_checkpoints(folder: str) -> list[CheckpointInfo]:
    """timm's `checkpoint-<epoch>.pth.tar` files of a folder (path or URL), oldest first, with
    `summary.csv` metrics."""
    storage, where = locate(folder)
    names = storage.listdir(where)
    numbered = [(int(m.group(1)), n) for n in names if (m := _TIMM_RE.match(n))]
    if not numbered:
        # `--checkpoint-hist 0` keeps no numbered files: the newest is `last.pth.tar`.
        numbered = [(-1, n) for n in _TIMM_LAST[:1] if n in names]
    summary = read_timm_summary(folder)
    found = []
    for epoch, name in sorted(numbered):
        path = storage.join(where, name)
        if epoch < 0:
            epoch = max(summary, default=0)
        found.append(
            CheckpointInfo(
                name=name,
                path=path,
                step=epoch,
                epoch=epoch,
                time=storage.mtime(path),
                metrics=dict(summary.get(epoch, {})),
                files=size_records([path]),
                kind="train",
                extra={"framework": TIMM},
            )
        )
    return found
