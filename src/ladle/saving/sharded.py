"""Sharded checkpoints: every rank writes its own part through `torch.distributed.checkpoint`.

When a registered model holds `DTensor`s (FSDP2's `fully_shard`, tensor
parallel), nothing is gathered onto one rank. Models and optimizers are taken
with `get_model_state_dict` / `get_optimizer_state_dict` (DCP's own
`torch.distributed.checkpoint.state_dict`), the EMA's weights as they are
(DTensors sharded like the model, `ladle.averaging.ema_shards`), and written by
`dcp.save` into the checkpoint's temporary directory under their registered
names; DCP reshards on load, so a checkpoint written by N ranks resumes on M (or
in one process without a process group).

Each rank writes one DCP file per registered object (`__<rank>_<n>.distcp`, n in
the order of the state: the models, the EMA, then the optimizers), not one file
for everything: `.metadata` records which file holds each piece, so a reader of
the model weights (`ladle avg`, `export`, `inspect`, `formats.dcp.DcpSource`)
reads and hashes only the model's files, not the optimizer state (about 2/3 of
the bytes under AdamW) it does not need. meta.json keeps one checksum per file,
as for every checkpoint; older checkpoints, one file per rank, read and verify
as before.

ladle's commit protocol across ranks (`ShardedCheckpointer.save`):
1. rank 0 opens the temporary directory (`Run.begin`, it holds the run's lock)
   and broadcasts its path;
2. every rank writes its DCP shards (`__<rank>_<n>.distcp`; rank 0 also writes
   `.metadata`) and its own `rank-<rank>.pt` (its RNG states and data position),
   then fsyncs and hashes the files it wrote;
3. rank 0 gathers every rank's checksums (a rank that failed reports its error
   instead, and nothing is committed), writes the global `state.pt` and
   `meta.json` last, renames the directory into place and updates the index;
4. the outcome is broadcast, so `save()` returns the same record (or raises the
   same error) on every rank; the caller applies retention on rank 0 and
   passes a barrier before returning.
A rank that dies mid-save leaves a `.tmp-*` directory that is never listed; the
next writer removes it.

A checkpoint on disk is itself a DCP folder (`.metadata` and `*.distcp` beside
`meta.json`), so `dcp.load` and other DCP readers open it directly.
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import logging
import os
import queue
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from torch import nn

from ladle.errors import CorruptCheckpoint, ShardedSaveError, StateMismatch
from ladle.formats.dcp_metadata import METADATA_NAME as DCP_METADATA
from ladle.state.model_weights import kind_of
from ladle.state.readers import EMA_NAME
from ladle.state.rng import capture_rng
from ladle.store.checkpoint import CheckpointInfo, FileRecord
from ladle.store.checksums import checksum_file, file_checksums
from ladle.store.run import Run

log = logging.getLogger("ladle")

RANK_FILE = "rank-{rank:05d}.pt"
RANK_FORMAT = "ladle-rank-state/1"
# Objects whose state differs per rank (their data position); everything else is saved once.
PER_RANK_KINDS = frozenset({"sampler"})


def distributed() -> bool:
    """True inside an initialized `torch.distributed` process group."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def rank_and_world() -> tuple[int, int]:
    import torch.distributed as dist

    if distributed():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def holds_sharded_tensors(module: nn.Module) -> bool:
    """True when a module's parameters or buffers are DTensors (FSDP2, tensor parallel)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch built without distributed support
        return False
    return any(isinstance(t, DTensor) for t in [*module.parameters(), *module.buffers()])


def is_sharded_checkpoint(info: CheckpointInfo) -> bool:
    """True for a checkpoint whose models and optimizers were written through DCP."""
    return DCP_METADATA in info.files


def broadcast_from_rank0(value: Any, group: Any = None) -> Any:
    """rank 0's `value` on every rank (`value` itself outside a process group)."""
    import torch.distributed as dist

    if not distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0, group=group)
    return box[0]


def _gather(value: Any, group: Any = None) -> list[Any]:
    """Every rank's `value` on rank 0 (an empty list elsewhere)."""
    import torch.distributed as dist

    if not distributed():
        return [value]
    rank, world = rank_and_world()
    found: list[Any] | None = [None] * world if rank == 0 else None
    dist.gather_object(value, found, dst=0, group=group)
    return found or []


def barrier(group: Any = None) -> None:
    import torch.distributed as dist

    if distributed():
        dist.barrier(group=group)


def checkpoint_group() -> Any:
    """A gloo group of every rank for a background save's collectives (a collective call).

    A save committing on a background thread must not interleave its collectives
    with the training loop's on the default group; its own group keeps them apart.
    """
    import torch.distributed as dist

    return dist.new_group(backend="gloo") if distributed() else None


@contextlib.contextmanager
def _quiet_no_dist() -> Iterator[None]:
    """DCP warns when it runs in one process, which is what a process without a group asks for."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


class ShardedCheckpointer:
    """Writes and reads the DCP part of a sharded checkpoint for a manager's registered objects.

    `models`, the `ema`'s weights and `optimizers` go through DCP (each optimizer
    with the model whose parameters it holds; the EMA's counters stay in
    `state.pt`); the manager's other objects stay in its `state.pt`
    (once, from rank 0) or, for per-rank kinds (`PER_RANK_KINDS`), in each rank's
    `rank-<rank>.pt` beside that rank's RNG states. `group`: the process group of
    the checkpoint's collectives (default: the default group; a background save
    passes `checkpoint_group()`).
    """

    def __init__(
        self,
        models: Mapping[str, nn.Module],
        optimizers: Mapping[str, torch.optim.Optimizer],
        *,
        ema: Any = None,
        group: Any = None,
    ) -> None:
        self.group = group
        self.models = dict(models)
        self.ema = ema
        self.optimizers = dict(optimizers)
        self.owners = {name: self._owner(name, opt) for name, opt in self.optimizers.items()}

    @classmethod
    def of(cls, objects: Mapping[str, Any], *, group: Any = None) -> ShardedCheckpointer:
        """The checkpointer of a manager's registered objects: its models and their optimizers."""
        models = {n: o for n, o in objects.items() if kind_of(o) == "model"}
        optimizers = {n: o for n, o in objects.items() if kind_of(o) == "optimizer"}
        return cls(models, optimizers, ema=objects.get(EMA_NAME), group=group)

    @staticmethod
    def kept_apart(objects: Mapping[str, Any]) -> set[str]:
        """Objects a sharded checkpoint keeps outside state.pt: in DCP, or in each rank's own file."""
        return {n for n, o in objects.items() if kind_of(o) in ("model", "optimizer", *PER_RANK_KINDS)}

    @staticmethod
    def own_rank_state(objects: Mapping[str, Any]) -> dict[str, Any]:
        """This rank's own state in a sharded checkpoint: its RNG states and data position."""
        states = {n: o.state_dict() for n, o in objects.items() if kind_of(o) in PER_RANK_KINDS}
        return {"rng": capture_rng(), "objects": states}

    def _owner(self, name: str, optimizer: torch.optim.Optimizer) -> nn.Module:
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        for model in self.models.values():
            if any(id(p) in held for p in model.parameters()):
                return model
        raise StateMismatch(
            f"optimizer {name!r} holds no parameter of a registered model; register the model it trains"
        )

    # -- the DCP state ------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        """{model name: its (sharded) state dict, "ema": the EMA's live weights, optimizer name: its
        state dict}, as DCP saves them (and loads into, in place)."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        out: dict[str, Any] = {name: get_model_state_dict(model) for name, model in self.models.items()}
        if self.ema is not None:
            out[EMA_NAME] = self.ema.weights()
        for name, optimizer in self.optimizers.items():
            out[name] = get_optimizer_state_dict(self.owners[name], optimizer)
        return out

    def apply(self, state: Mapping[str, Any]) -> None:
        """Load a state read back by DCP into the live models and optimizers.

        The EMA's weights need nothing more: DCP read them into the EMA's own tensors.
        """
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

        for name, model in self.models.items():
            set_model_state_dict(model, state[name])
        for name, optimizer in self.optimizers.items():
            set_optimizer_state_dict(self.owners[name], optimizer, state[name])

    # -- saving -------------------------------------------------------------------------

    def save(
        self,
        run: Run,
        name: str,
        *,
        once: Sequence[tuple[str, Callable[[str], None]]],
        per_rank: Mapping[str, Any],
        commit: Mapping[str, Any],
        before_commit: Callable[[], None] | None = None,
        state: Mapping[str, Any] | None = None,
        write_shards: Callable[[Mapping[str, Any], str], None] | None = None,
    ) -> CheckpointInfo:
        """Write and commit one sharded checkpoint on every rank (a collective call).

        `once`: (file name, writer) pairs rank 0 writes (the global `state.pt`);
        `per_rank`: this rank's own payload (RNG, data position); `commit`: the
        keyword arguments of `PendingCheckpoint.commit`. `state` is the DCP state to
        write (default: taken now); `write_shards(state, path)` writes it (default
        `dcp.save`; the asynchronous path passes its own). Returns the committed
        record on every rank.
        """
        rank, _ = rank_and_world()
        pending = None
        opened: tuple[str | None, str | None] = (None, None)
        if rank == 0:
            try:
                pending = run.begin(name)
                opened = (pending.tmp_path, None)
            except Exception as exc:
                opened = (None, f"{type(exc).__name__}: {exc}")
        tmp_path, error = broadcast_from_rank0(opened, self.group)
        if error is not None:
            raise ShardedSaveError(f"{run.path}: cannot start checkpoint {name}: {error}")
        assert tmp_path is not None
        local: tuple[dict[str, FileRecord], str | None]
        try:
            local = (self._write_rank(tmp_path, rank, once, per_rank, state, write_shards), None)
        except Exception as exc:
            log.exception("rank %d: writing sharded checkpoint %s failed", rank, name)
            local = ({}, f"rank {rank}: {type(exc).__name__}: {exc}")
        reports = _gather(local, self.group)
        outcome: tuple[dict[str, Any] | None, str | None] = (None, None)
        if rank == 0:
            assert pending is not None
            errors = [e for _, e in reports if e]
            if errors:
                pending.abort()
                outcome = (None, "; ".join(errors))
            else:
                try:
                    for records, _ in reports:
                        pending.add_written(records)
                    if before_commit is not None:
                        before_commit()
                    outcome = (pending.commit(**commit).to_meta(), None)
                except Exception as exc:
                    pending.abort()
                    outcome = (None, f"rank 0: {type(exc).__name__}: {exc}")
        meta, error = broadcast_from_rank0(outcome, self.group)
        if error is not None:
            raise ShardedSaveError(f"{run.path}: sharded checkpoint {name} was not committed ({error})")
        if rank != 0:
            run.refresh()
        return CheckpointInfo.from_meta(meta, run.storage.join(run.path, meta["name"]))

    def _write_rank(
        self,
        tmp_path: str,
        rank: int,
        once: Sequence[tuple[str, Callable[[str], None]]],
        per_rank: Mapping[str, Any],
        state: Mapping[str, Any] | None,
        write_shards: Callable[[Mapping[str, Any], str], None] | None,
    ) -> dict[str, FileRecord]:
        """This rank's files in the temporary directory, written, fsynced and hashed."""
        (write_shards or write_dcp)(state if state is not None else self.state(), tmp_path, self.group)
        mine = [RANK_FILE.format(rank=rank)]
        torch.save({"format": RANK_FORMAT, "rank": rank, **per_rank}, os.path.join(tmp_path, mine[0]))
        if rank == 0:
            for filename, writer in once:
                writer(os.path.join(tmp_path, filename))
                mine.append(filename)
            mine.append(DCP_METADATA)
        mine += [f for f in os.listdir(tmp_path) if fnmatch.fnmatch(f, f"__{rank}_*.distcp")]
        return _sync_and_hash(tmp_path, mine)

    # -- resuming -----------------------------------------------------------------------

    def verify(self, run: Run, info: CheckpointInfo, *, verify: bool = True) -> None:
        """Raise `CorruptCheckpoint` on every rank when any rank finds a bad file (a collective call).

        Every rank checks the sizes of all files and, with `verify`, the checksums
        of its share of them, so a large checkpoint is hashed in parallel.
        """
        rank, world = rank_and_world()
        problems = _check_share(run, info, rank, world, verify)
        found = [p for ps in _gather(problems) for p in ps]
        first = broadcast_from_rank0(found[0] if found else None)
        if first is not None:
            raise CorruptCheckpoint(f"{first}; resume(fallback=True) uses the previous good checkpoint")

    def rank_payload(self, run: Run, info: CheckpointInfo) -> dict[str, Any]:
        """This rank's RNG states and data position; with more ranks than saved, rank r takes r mod N."""
        rank, world = rank_and_world()
        saved = sorted(int(f[5:10]) for f in info.files if f.startswith("rank-") and f.endswith(".pt"))
        if not saved:
            return {}
        source = rank if rank in saved else saved[rank % len(saved)]
        if len(saved) != world:
            log.warning(
                "%s was saved by %d ranks and resumes on %d: rank %d takes rank %d's RNG and data position",
                info.name,
                len(saved),
                world,
                rank,
                source,
            )
        path = info.file(RANK_FILE.format(rank=source))
        with run.storage.open(path, "rb") as handle:
            payload = torch.load(handle, map_location="cpu", weights_only=True)
        if not isinstance(payload, dict) or payload.get("format") != RANK_FORMAT:
            raise CorruptCheckpoint(f"{path}: not a ladle rank state file; run `ladle verify`")
        return payload

    def load_into(self, info: CheckpointInfo) -> None:
        """Read the DCP part into the live models, EMA and optimizers, resharded to this job's layout."""
        state = self.state()
        read_dcp(state, info.path)
        self.apply(state)

    def load_weights_into(self, info: CheckpointInfo, *, ema: bool = True) -> None:
        """Read the models' weights and (with `ema`) the EMA's, not the optimizers' (a collective call)."""
        weights_only = ShardedCheckpointer(self.models, {}, ema=self.ema if ema else None, group=self.group)
        weights_only.load_into(info)

    def ema_weights(self) -> dict[str, torch.Tensor] | None:
        """The EMA's live weights, which `load_into` fills in place (None without an EMA)."""
        return self.ema.weights() if self.ema is not None else None


def write_dcp(state: Mapping[str, Any], path: str, group: Any = None) -> None:
    """`dcp.save` of `state` into the folder `path` (in one process when there is no group).

    Each rank writes one file per top-level entry of `state` (`_writer_class`).
    """
    import torch.distributed.checkpoint as dcp

    with _quiet_no_dist():
        dcp.save(
            dict(state),
            storage_writer=_writer_class()(path),
            process_group=group,
            no_dist=not distributed(),
        )


@functools.cache
def _writer_class() -> type:
    """DCP's `FileSystemWriter`, writing one file per rank and top-level entry (model, EMA, optimizer).

    DCP names a rank's files `__<rank>_<n>.distcp` and records in `.metadata`
    where every piece lies, so any split reads back with DCP's own reader; this
    one puts each registered object in a file of its own, so reading the model
    reads (and hashes) none of the optimizer's bytes. It reuses the writer's
    file queue (`_write_data`); a torch without it writes DCP's one file per rank.
    """
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint import filesystem as dcp_files

    if not hasattr(FileSystemWriter, "_write_data") or not hasattr(dcp_files, "DEFAULT_SUFFIX"):
        return FileSystemWriter

    class EntryFileWriter(FileSystemWriter):
        def write_data(self, plan: Any, planner: Any) -> Any:
            entries: dict[str, list[Any]] = {}
            for item in plan.items:
                entries.setdefault(item.index.fqn.split(".", 1)[0], []).append(item)
            files: queue.Queue[Any] = queue.Queue()
            for number, items in enumerate(entries.values()):
                name = f"{plan.storage_data.prefix}{number}{dcp_files.DEFAULT_SUFFIX}"
                files.put((self.fs.concat_path(self.path, name), name, items))
            return self._write_data(planner, files)

    return EntryFileWriter


def read_dcp(state: dict[str, Any], path: str) -> None:
    """`dcp.load` into `state` in place, resharding to this job's layout; errors name what differs."""
    import torch.distributed.checkpoint as dcp

    from ladle.formats.dcp import _reader_class
    from ladle.formats.dcp_metadata import read_metadata

    # The metadata is read without running code from it, then handed to DCP's reader.
    metadata = read_metadata(path)
    try:
        with _quiet_no_dist():
            dcp.load(state, storage_reader=_reader_class()(path, metadata), no_dist=not distributed())
    except Exception as exc:
        missing = _missing_keys(state, metadata)
        detail = f"missing in the checkpoint: {', '.join(missing[:5])}" if missing else str(exc)
        raise StateMismatch(
            f"{path}: cannot load the sharded state into this job ({detail.splitlines()[0][:300]}); "
            "register the same models and optimizers as the saving run"
        ) from exc


def _missing_keys(state: Mapping[str, Any], metadata: Any) -> list[str]:
    from torch.distributed.checkpoint._nested_dict import flatten_state_dict

    flat, _ = flatten_state_dict(dict(state))
    return sorted(k for k in flat if k not in metadata.state_dict_metadata)


def _sync_and_hash(folder: str, filenames: Iterable[str]) -> dict[str, FileRecord]:
    """fsync and checksums of files this rank wrote, on two threads, largest first."""
    from ladle.store.storage import LocalStorage

    storage = LocalStorage()
    paths = {f: os.path.join(folder, f) for f in filenames}
    order = sorted(paths, key=lambda f: -os.path.getsize(paths[f]))
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="ladle-shard") as pool:
        hashed = {f: pool.submit(file_checksums, storage, paths[f]) for f in order}
        synced = [pool.submit(storage.fsync_file, paths[f]) for f in order]
        for future in synced:
            future.result()
        return {f: FileRecord(size=os.path.getsize(paths[f]), **hashed[f].result()) for f in order}


def _check_share(run: Run, info: CheckpointInfo, rank: int, world: int, verify: bool) -> list[str]:
    """Sizes of every file, and checksums of every `world`-th file from `rank` (the share of this rank)."""
    problems = []
    for index, (filename, record) in enumerate(sorted(info.files.items())):
        path = info.file(filename)
        if not run.storage.exists(path):
            problems.append(f"{path}: missing")
            continue
        if run.storage.size(path) != record.size:
            problems.append(f"{path}: {run.storage.size(path)} bytes, meta.json recorded {record.size}")
            continue
        checksum = record.checksum() if verify and index % world == rank else None
        if checksum is not None and checksum_file(run.storage, path, checksum.algorithm) != checksum.hex:
            problems.append(f"{path}: checksum does not match meta.json (corrupted)")
    return problems
