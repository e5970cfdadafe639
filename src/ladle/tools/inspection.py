"""What `ladle inspect` reports about a checkpoint, as a library call.

`inspect_checkpoint(path)` opens any file or folder `ladle.formats.load_source`
reads and returns an `Inspection`: the format, every tensor (name, shape,
dtype, bytes), element counts, sizes, and for training checkpoints which
training state they hold (optimizer, scheduler, RNG, EMA, ...). Tensor data is
never read, only headers and pickle structure, so inspecting a 10 GB file is
instant. Nothing from a file runs: pickles load with `weights_only=True`; one
that needs more is described from its structure (`ladle.state.pickle_scan`) and the
user is told it needs `--trust`. The training state of each layout is found by
`ladle.tools.inspection_state`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ladle.errors import CheckpointNotFound, CorruptCheckpoint, UnsafeLoad
from ladle.formats.gc_pause import paused_gc
from ladle.formats.load import load_source
from ladle.metrics import json_value
from ladle.state.contents import (
    StateItem,
    StateKind,
    count_tensors,
    describe_training_dict,
    opaque_name,
)
from ladle.state.pickle_scan import Opaque, scan_pickle
from ladle.store.checkpoint import load_meta
from ladle.store.layout import META_NAME
from ladle.store.paths import (
    local_copy,
    path_exists,
    path_file_sizes,
    path_isdir,
    path_isfile,
    path_size,
    read_path,
)
from ladle.store.refs import is_run_dir, resolve_checkpoint
from ladle.store.run import Run
from ladle.store.storage import is_url, local_path_of
from ladle.tools.inspection_state import (
    PICKLE_SUFFIXES,
    ladle_state_items,
    pickle_state,
    trainer_folder_state,
)


@dataclass(kw_only=True, frozen=True, slots=True)  # slots: half the cost of 100,000 rows
class TensorRow:
    """One stored tensor, described from the file's header."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    numel: int
    nbytes: int
    tied_to: str | None = None
    """The name this tensor shares storage with (tied weights), stored once."""


@dataclass(kw_only=True, frozen=True)
class DtypeTotal:
    """Totals of the tensors of one dtype."""

    dtype: str
    tensors: int
    numel: int
    nbytes: int


@dataclass(kw_only=True)
class Inspection:
    """Everything `ladle inspect` shows about one checkpoint."""

    path: str
    format: str
    weights: str | None
    """Which weights the tensor list shows ("model", "ema", a key), when there is a choice."""
    tensors: list[TensorRow]
    file_bytes: int
    """Bytes on disk of the file, or of every file of the checkpoint folder."""
    files: dict[str, int] = field(default_factory=dict)
    """File name -> bytes, for checkpoint folders."""
    checkpoint: dict[str, Any] | None = None
    """A ladle checkpoint's record: name, step, epoch, time, metrics, pinned, kind."""
    training_state: list[StateItem] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def numel(self) -> int:
        """Elements of all stored tensors (tied tensors counted once)."""
        return sum(t.numel for t in self.tensors if t.tied_to is None)

    @property
    def tensor_bytes(self) -> int:
        """Bytes of all stored tensors (tied tensors counted once)."""
        return sum(t.nbytes for t in self.tensors if t.tied_to is None)

    def by_dtype(self) -> list[DtypeTotal]:
        """Totals per dtype, largest first."""
        totals: dict[str, list[int]] = {}
        for t in self.tensors:
            if t.tied_to is None:
                row = totals.setdefault(t.dtype, [0, 0, 0])
                row[0] += 1
                row[1] += t.numel
                row[2] += t.nbytes
        return sorted(
            (DtypeTotal(dtype=k, tensors=v[0], numel=v[1], nbytes=v[2]) for k, v in totals.items()),
            key=lambda d: -d.nbytes,
        )

    def by_module(self, depth: int = 1) -> dict[str, int]:
        """Elements per key prefix of `depth` components (`encoder`, `decoder`, ...)."""
        counts: dict[str, int] = {}
        for t in self.tensors:
            if t.tied_to is None:
                prefix = ".".join(t.name.split(".")[:depth]) if "." in t.name else "(top level)"
                counts[prefix] = counts.get(prefix, 0) + t.numel
        return counts

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (what `ladle inspect --json` prints)."""
        return {
            "path": self.path,
            "format": self.format,
            "weights": self.weights,
            "file_bytes": self.file_bytes,
            "tensor_count": len(self.tensors),
            "numel": self.numel,
            "tensor_bytes": self.tensor_bytes,
            "by_dtype": [vars(d) for d in self.by_dtype()],
            "by_module": self.by_module(),
            "files": self.files,
            "checkpoint": self.checkpoint,
            "training_state": [s.to_dict() for s in self.training_state],
            "metadata": self.metadata,
            "notes": self.notes,
            "tensors": [
                {
                    "name": t.name,
                    "shape": list(t.shape),
                    "dtype": t.dtype,
                    "numel": t.numel,
                    "nbytes": t.nbytes,
                    "tied_to": t.tied_to,
                }
                for t in self.tensors
            ],
        }


def inspect_checkpoint(
    path: str | os.PathLike[str],
    *,
    key: str | None = None,
    strip_prefix: str | Sequence[str] | None = (),
    trust: bool = False,
) -> Inspection:
    """Describe a checkpoint file or folder without reading tensor data.

    A run directory shows its latest checkpoint; `RUN/best`, `RUN/latest` and
    `RUN/<step>` name one of its checkpoints. `key` picks the weights (`"ema"`
    in a ladle checkpoint, a nested key in a pickle); `trust=True` allows full
    unpickling of pickles that hold more than tensors (that runs code from the file).
    """
    text = resolve_checkpoint(path)
    text = text if is_url(text) else os.path.abspath(local_path_of(text))
    if not path_exists(text):
        raise CheckpointNotFound(f"{text}: no such file or directory")
    notes: list[str] = []
    if is_run_dir(text):
        run = Run(text)
        latest = run.latest()
        if latest is None:
            raise CheckpointNotFound(
                f"{text}: a run without checkpoints; nothing to inspect (see `ladle ls {text}`)"
            )
        notes.append(f"a run with {len(run)} checkpoints; showing the latest, {latest.name}")
        text = latest.path

    try:
        source = load_source(text, key=key, strip_prefix=strip_prefix, trust=trust)
    except UnsafeLoad as exc:
        return _unsafe_pickle(text, exc, notes)
    with source, paused_gc():  # one row per tensor, 100,000 in a MoE model: see gc_pause
        ties = source.ties()
        tensors = []
        for name, info in source.infos().items():  # from the header: no torch, no tensor data
            tensors.append(
                TensorRow(
                    name=name,
                    shape=info.dims,
                    dtype=info.dtype_name,
                    numel=info.numel,
                    nbytes=info.nbytes,
                    tied_to=ties.get(name),
                )
            )
        fmt = source.format
        metadata = {k: v for k, v in source.metadata.items() if k != "__metadata__"}
    result = Inspection(
        path=text,
        format=fmt,
        weights=key or ("model" if fmt == "ladle" else None),
        tensors=tensors,
        file_bytes=0,
        metadata=_plain(metadata),
        notes=notes,
    )
    if fmt == "ladle":
        _add_ladle_checkpoint(result, text)
    elif path_isdir(text):
        result.files = _dir_files(text)
        if not is_url(text):
            result.training_state = trainer_folder_state(text, trust)
    elif text.lower().endswith(PICKLE_SUFFIXES) or fmt == "torch":
        with local_copy(text) as local:
            result.training_state = pickle_state(local, trust)
        _note_weight_sets(result)
    result.file_bytes = sum(result.files.values()) if result.files else _size(text)
    return result


def _note_weight_sets(result: Inspection) -> None:
    """Name the weight sets of a training pickle (raw, EMA) and how to choose each."""
    raw = [i.name for i in result.training_state if i.kind == StateKind.WEIGHTS]
    ema = [i.name for i in result.training_state if i.kind == StateKind.EMA]
    if raw and ema:
        result.notes.append(
            f"weight sets: {', '.join(raw)} (read by default), {', '.join(ema)} (EMA: --ema, key='ema')"
        )


def _size(path: str) -> int:
    return path_size(path) if path_isfile(path) else sum(_dir_files(path).values())


def _dir_files(path: str) -> dict[str, int]:
    return path_file_sizes(path)


def _plain(value: Any) -> Any:
    """Metadata as strict JSON values (non-finite numbers as "nan"/"inf", objects as text)."""
    return json_value(value)


# -- ladle checkpoints -------------------------------------------------------------


def _add_ladle_checkpoint(result: Inspection, path: str) -> None:
    meta_path = os.path.join(path, META_NAME)
    try:
        info = load_meta(read_path(meta_path), path)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CorruptCheckpoint(
            f"{meta_path}: unreadable meta.json ({exc}); run `ladle verify` on the run"
        ) from None
    result.checkpoint = {
        "name": info.name,
        "step": info.step,
        "epoch": info.epoch,
        "time": info.time,
        "metrics": info.metrics,
        "pinned": info.pinned,
        "kind": info.kind,
        "monitor": info.monitor,
    }
    result.files = {name: record.size for name, record in sorted(info.files.items())}
    result.files[META_NAME] = path_size(meta_path)
    result.training_state = ladle_state_items(path, info)


def _unsafe_pickle(path: str, exc: UnsafeLoad, notes: list[str]) -> Inspection:
    """A pickle weights-only loading refuses: describe its structure, list no tensors."""
    from ladle.formats.safe_globals import safe_global_names

    scan = scan_pickle(path)
    unsafe = [name for name in scan.globals if name not in safe_global_names()]
    classes = ", ".join(unsafe[:6]) + (", ..." if len(unsafe) > 6 else "")
    if "plain pickle" in str(exc):
        notes.append("a plain pickle (pickle.dump), not a file torch.save wrote: its structure is shown")
    else:
        notes.append(
            f"needs --trust to list its tensors: the pickle names {classes or 'unknown classes'}, "
            "and loading it would run code from the file; pass --trust only for files you trust"
        )
    obj = scan.obj
    if isinstance(obj, Opaque):
        state = [
            StateItem(
                name="(file)",
                kind=StateKind.OBJECT,
                summary=f"pickled {opaque_name(obj)} object (loading it needs --trust)",
                tensors=count_tensors(obj)[0],
                nbytes=count_tensors(obj)[1],
            )
        ]
    else:
        state = describe_training_dict(obj)
    return Inspection(
        path=path,
        format="torch",
        weights=None,
        tensors=[],
        file_bytes=_size(path),
        training_state=state,
        notes=notes,
    )
