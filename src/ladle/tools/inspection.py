"""What `ladle inspect` reports about a checkpoint, as a library call.

`inspect_checkpoint(path)` opens any file or folder `ladle.formats.load_source`
reads and returns an `Inspection`: the format, every tensor (name, shape,
dtype, bytes), element counts, sizes, and for training checkpoints which
training state they hold (optimizer, scheduler, RNG, EMA, ...). Tensor data is
never read, only headers and pickle structure, so inspecting a 10 GB file is
instant. Nothing from a file runs: pickles load with `weights_only=True`; one
that needs more is described from its structure (`ladle.pickle_scan`) and the
user is told it needs `--trust`.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ladle.errors import CheckpointNotFound, CorruptCheckpoint, FormatError, UnsafeLoad
from ladle.formats import load_source
from ladle.state.contents import (
    StateItem,
    StateKind,
    count_tensors,
    describe_ladle_state,
    describe_training_dict,
    format_count,
    opaque_name,
    summarize,
)
from ladle.state.pickle_scan import Opaque, scan_pickle
from ladle.store.refs import is_run_dir, resolve_checkpoint
from ladle.store.run import META_NAME, CheckpointInfo, Run

log = logging.getLogger("ladle")

_PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".tar", ".pkl", ".pickle")
# Files of a transformers Trainer checkpoint folder and what they hold.
_TRAINER_FILES = {
    "optimizer": StateKind.OPTIMIZER,
    "scheduler": StateKind.SCHEDULER,
    "scaler": StateKind.GRAD_SCALER,
    "rng_state": StateKind.RNG,
    "training_args": StateKind.CONFIG,
}


@dataclass(kw_only=True, frozen=True)
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
    text = os.path.abspath(resolve_checkpoint(path))
    if not os.path.exists(text):
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
    with source:
        ties = source.ties()
        tensors = []
        for name in source:
            shape, dtype = source.info(name)
            numel = int(shape.numel())
            tensors.append(
                TensorRow(
                    name=name,
                    shape=tuple(int(s) for s in shape),
                    dtype=str(dtype).replace("torch.", ""),
                    numel=numel,
                    nbytes=numel * dtype.itemsize,
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
    elif os.path.isdir(text):
        result.files = _dir_files(text)
        result.training_state = _trainer_folder_state(text, trust)
    elif text.lower().endswith(_PICKLE_SUFFIXES) or fmt == "torch":
        result.training_state = _pickle_state(text, trust)
    result.file_bytes = sum(result.files.values()) if result.files else _size(text)
    return result


def _size(path: str) -> int:
    return os.path.getsize(path) if os.path.isfile(path) else sum(_dir_files(path).values())


def _dir_files(path: str) -> dict[str, int]:
    out = {}
    for root, _dirs, files in os.walk(path):
        for name in files:
            full = os.path.join(root, name)
            out[os.path.relpath(full, path)] = os.path.getsize(full)
    return dict(sorted(out.items()))


def _plain(value: Any) -> Any:
    """Metadata as JSON values (tensors and other objects become text)."""
    try:
        json.dumps(value)
        return value
    except (TypeError, ValueError):
        if isinstance(value, dict):
            return {str(k): _plain(v) for k, v in value.items()}
        return str(value)


# -- ladle checkpoints -------------------------------------------------------------


def _add_ladle_checkpoint(result: Inspection, path: str) -> None:
    meta_path = os.path.join(path, META_NAME)
    try:
        with open(meta_path, "rb") as handle:
            info = CheckpointInfo.from_meta(json.load(handle), path)
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
    result.files[META_NAME] = os.path.getsize(meta_path)
    items: list[StateItem] = []
    for filename in sorted(info.files):
        if filename.endswith(".safetensors"):
            items.append(_weights_file_item(path, filename))
    if "state.pt" in info.files:
        state_path = os.path.join(path, "state.pt")
        try:
            state = torch.load(state_path, map_location="cpu", weights_only=True, mmap=True)
        except (OSError, RuntimeError, pickle.UnpicklingError, EOFError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
            raise CorruptCheckpoint(
                f"{state_path}: cannot be read ({first}); run `ladle verify` on the run"
            ) from None
        if isinstance(state, dict):
            items.extend(describe_ladle_state(state))
    result.training_state = items


def _weights_file_item(path: str, filename: str) -> StateItem:
    name = filename[: -len(".safetensors")]
    with load_source(path, key=name) as source:
        ties = source.ties()
        infos = [source.info(k) for k in source if k not in ties]
    numel = sum(int(i.shape.numel()) for i in infos)
    nbytes = sum(int(i.shape.numel()) * i.dtype.itemsize for i in infos)
    dtypes = sorted({str(i.dtype).replace("torch.", "") for i in infos})
    kind = StateKind.EMA if name == "ema" else StateKind.WEIGHTS
    label = "EMA weights" if name == "ema" else f"weights of {name!r}"
    return StateItem(
        name=filename,
        kind=kind,
        summary=f"{label}: {len(infos)} tensors, {format_count(numel)} elements ({', '.join(dtypes) or '?'})",
        tensors=len(infos),
        nbytes=nbytes,
    )


# -- pickles -------------------------------------------------------------------------


def _load_weights_only(path: str) -> Any:
    """The object in a torch pickle, loaded without running code; raises UnsafeLoad."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=_is_zip(path))
    except pickle.UnpicklingError as exc:
        if "Weights only load failed" in str(exc):
            raise UnsafeLoad(f"{path}: needs full unpickling") from None
        raise FormatError(f"{path}: not a readable torch checkpoint ({exc})") from None
    except (RuntimeError, EOFError, ValueError) as exc:
        raise FormatError(f"{path}: not a readable torch checkpoint ({exc})") from None


def _is_zip(path: str) -> bool:
    import zipfile

    return zipfile.is_zipfile(path)


def _pickle_state(path: str, trust: bool) -> list[StateItem]:
    try:
        obj = _load_weights_only(path)
    except UnsafeLoad:
        if not trust:
            return describe_training_dict(scan_pickle(path).obj)
        log.warning("%s: fully unpickling (trusted)", path)
        obj = torch.load(path, map_location="cpu", weights_only=False)
    return describe_training_dict(obj)


def _unsafe_pickle(path: str, exc: UnsafeLoad, notes: list[str]) -> Inspection:
    """A pickle weights-only loading refuses: describe its structure, list no tensors."""
    scan = scan_pickle(path)
    classes = ", ".join(scan.globals[:6]) + (", ..." if len(scan.globals) > 6 else "")
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


def _trainer_folder_state(path: str, trust: bool) -> list[StateItem]:
    """Training state files beside the weights (a transformers Trainer checkpoint)."""
    items: list[StateItem] = []
    for name in sorted(os.listdir(path)):
        full = os.path.join(path, name)
        stem = name.split(".", 1)[0]
        if not os.path.isfile(full):
            continue
        if name == "trainer_state.json":
            items.append(_trainer_json(full))
            continue
        kind = next((k for prefix, k in _TRAINER_FILES.items() if stem.startswith(prefix)), None)
        if kind is None or not name.endswith(_PICKLE_SUFFIXES):
            continue
        try:
            obj = _load_weights_only(full)
        except UnsafeLoad:
            obj = scan_pickle(full).obj if not trust else torch.load(full, weights_only=False)
        except FormatError as exc:
            items.append(StateItem(name=name, kind=kind, summary=f"unreadable: {exc}"))
            continue
        count, nbytes = count_tensors(obj)
        items.append(
            StateItem(name=name, kind=kind, summary=summarize(kind, obj), tensors=count, nbytes=nbytes)
        )
    return items


def _trainer_json(path: str) -> StateItem:
    try:
        with open(path, "rb") as handle:
            state = json.load(handle)
        summary = f"global_step {state.get('global_step')}, epoch {state.get('epoch')}"
        history = state.get("log_history") or []
        if history:
            summary += f", {len(history)} log records"
        best = state.get("best_metric")
        if best is not None:
            summary += f", best metric {best}"
    except (OSError, ValueError, AttributeError) as exc:
        summary = f"unreadable: {exc}"
    return StateItem(name=os.path.basename(path), kind=StateKind.COUNTER, summary=summary)
