"""The averaging engine: a streaming, weighted mean over checkpoints, one tensor at a time.

Each key is summed block by block (1 MiB of float32): the block of every member
is read (`TensorSource.read_block`: a view of the member's file mapped privately
for local safetensors and pickles, so nothing is copied; a ranged read into a small
reused buffer for files on a store) and added into an accumulator block while it is
in the CPU cache. The same read feeds the members' checksums
(`ladle.averaging.integrity`: the block is hashed on another thread while the next
one is read, and its pages are dropped from the process once hashed), so verifying
costs no second pass. A safetensors output is written block by block
(`Averager.write_to`: each summed block goes to a writer thread through a ring of
eight block buffers, and the file is flushed to disk in the background as it grows),
so nothing as large as a tensor is allocated: on a machine where fresh memory is
slow to touch, a buffer the size of the largest tensor costs as much as the average.
In-memory results (`stream()`) use an accumulator as large as the largest tensor.
Peak memory is a few MiB plus the blocks being hashed, whatever the number and
size of the checkpoints. Rules:

- floating tensors accumulate in float32 (float64 on request, and always for
  float64 members) and are written in the members' dtype unless `dtype` says
  otherwise: bf16/fp16 members are averaged in float32 and rounded once;
- integer and bool tensors (BatchNorm `num_batches_tracked`, step counters) are
  never averaged as floats; `IntPolicy` decides (`ladle.averaging.int_policies`);
- tied tensors (one tensor under several names) stay tied;
- members must agree on keys, shapes and dtypes (`ladle.averaging.plan`);
- a NaN or inf in any member is an error that names the file and key.

Reading from disk overlaps the work too: keys are taken in each file's storage
order, so every member is read front to back and the kernel's read-ahead fills
a cold cache while the CPU sums. (Asking for the next key explicitly with
`posix_fadvise(WILLNEED)` was measured: it costs about 2 ms per 4 MiB on cached
files, some 10% of a warm average, and gains nothing the read-ahead does not.)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from ladle.averaging.int_policies import combine_ints
from ladle.averaging.integrity import Mismatch, StreamHasher
from ladle.averaging.members import Member
from ladle.averaging.plan import AverageOptions, KeyPlan, Kind, Plan
from ladle.errors import ConfigError, NonFiniteValues
from ladle.formats.dtypes import dtype_name
from ladle.formats.source import read_into
from ladle.formats.write import SafetensorsWriter, tensor_bytes

BLOCK = 1 << 18
"""Elements per block: 1 MiB of float32, so a block of the accumulator and one of
an input stay in the CPU cache while every member is added."""
Progress = Callable[[int], None]
"""Called with a number of bytes just processed, for progress bars."""


class Averager:
    """Streams the weighted average of `members`, key by key, following a `Plan`.

    With `hashing`, every block read also feeds its member's checksum; `finish()`
    then returns the members whose bytes differ from their recorded checksums.
    Close it (or use it as a context manager) to stop the hashing threads.
    """

    def __init__(
        self,
        members: Sequence[Member],
        weights: Sequence[float],
        plan: Plan,
        options: AverageOptions,
        *,
        uniform: bool = False,
        hashing: bool = False,
        progress: Progress | None = None,
    ) -> None:
        if len(weights) != len(members):
            raise ConfigError(f"{len(weights)} weights for {len(members)} members")
        self.members = list(members)
        self.weights = [float(w) for w in weights]
        self.plan = plan
        self.options = options
        # Uniform weights: sum, then divide once (what fairseq does; exact for small integers).
        self.uniform = uniform or len(set(self.weights)) == 1
        self.progress = progress
        # Blocks of the inputs are read here: small enough to stay in the CPU cache.
        widest = max((p.info.itemsize for p in plan.keys.values()), default=1)
        self._scratch = torch.empty(BLOCK * widest, dtype=torch.uint8)
        self._hasher = StreamHasher(members, BLOCK * widest) if hashing else None
        acc_bytes = max(
            (p.info.numel * p.acc_dtype.itemsize for p in plan.keys.values() if p.acc_dtype is not None),
            default=8,
        )
        out_bytes = max(
            (
                p.info.numel * p.out_dtype.itemsize
                for p in plan.keys.values()
                if p.acc_dtype is not None and p.out_dtype != p.acc_dtype
            ),
            default=8,
        )
        # Two of each, used in turn, so a writer thread can still be writing the
        # previous key while the next one is computed. Untouched pages of
        # torch.empty cost no memory, so buffers that are never used cost nothing.
        self._accs = [torch.empty(max(acc_bytes, 8), dtype=torch.uint8) for _ in range(2)]
        self._outs = [torch.empty(max(out_bytes, 8), dtype=torch.uint8) for _ in range(2)]
        self._turn = 0

    @property
    def accumulator_bytes(self) -> int:
        """Memory held for accumulating: two buffers (one being written while the other is
        computed), each as large as the largest tensor in the accumulator dtype."""
        return sum(b.numel() for b in self._accs)

    @property
    def _acc(self) -> torch.Tensor:
        return self._accs[self._turn]

    @property
    def _out(self) -> torch.Tensor:
        return self._outs[self._turn]

    def _owns(self, tensor: torch.Tensor) -> bool:
        ptr = tensor.untyped_storage().data_ptr()
        buffers = (*self._accs, *self._outs, self._scratch)
        return ptr in {b.untyped_storage().data_ptr() for b in buffers}

    def __enter__(self) -> Averager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the hashing threads, if any (idempotent)."""
        if self._hasher is not None:
            self._hasher.close()

    def finish(self) -> list[Mismatch]:
        """After every key: hash the rest of each member's files, record the checksums read on
        the members, and list the files whose bytes differ from their recorded checksum."""
        return self._hasher.finish() if self._hasher is not None else []

    def stream(self, order: Sequence[str], *, copy: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
        """(key, averaged tensor) for every stored key in `order`.

        Without `copy`, a yielded tensor may live in a buffer that is reused two
        keys later: finish with it (write it) before asking for the key after next.
        """
        # The work comes in cache-sized blocks, far too small for torch's thread
        # pool to pay off: its barriers only add waiting (badly so on a busy
        # machine). One thread computes while another writes the output.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            for key in order:
                plan = self.plan.keys[key]
                if plan.kind is Kind.FLOAT:
                    out = self._float(plan)
                else:
                    out = self._int(plan)
                if copy and self._owns(out):
                    out = out.clone()
                yield key, out
        finally:
            torch.set_num_threads(threads)

    def _read(self, index: int, key: str) -> torch.Tensor:
        member = self.members[index]
        tensor = read_into(member.source, key, self._scratch)
        if self.progress is not None:
            self.progress(tensor.numel() * tensor.element_size())
        return tensor

    def _float(self, plan: KeyPlan) -> torch.Tensor:
        """Average one floating key into a buffer as large as the tensor, block by block."""
        key, acc_dtype = plan.key, plan.acc_dtype
        assert acc_dtype is not None
        numel = plan.info.numel
        self._turn ^= 1
        acc = self._acc[: numel * acc_dtype.itemsize].view(acc_dtype)
        narrow = plan.out_dtype != acc_dtype
        out = self._out[: numel * plan.out_dtype.itemsize].view(plan.out_dtype) if narrow else acc
        finite = True
        for start in range(0, numel, BLOCK):
            count = min(BLOCK, numel - start)
            block = acc[start : start + count]
            self._sum_block(plan, start, count, block)
            finite = self._check_and_cast(plan, block, out[start : start + count] if narrow else None, finite)
        self._release(key)
        if not finite:
            self._explain_non_finite(key)
        return out.view(plan.info.shape)

    def _release(self, key: str) -> None:
        """Every member is done with `key`: its pages go once the hashing has read them."""
        for i, member in enumerate(self.members):
            if self._hasher is not None:
                self._hasher.release(i, key)
            else:
                member.source.release(key)

    def _sum_block(self, plan: KeyPlan, start: int, count: int, block: torch.Tensor) -> None:
        """`block` = the weighted mean of every member's elements [start, start + count) of the key.

        Each member's block is read (a view of a mapped file, or a copy into a small buffer)
        and added while `block` is in the CPU cache, so each input byte crosses memory once.
        """
        key, acc_dtype = plan.key, plan.acc_dtype
        hasher = self._hasher
        first: torch.Tensor | None = None  # member 0's block, when it can wait for member 1's
        for i, member in enumerate(self.members):
            source = member.source
            buffer = hasher.buffer() if hasher is not None else self._scratch
            x = source.read_block(key, start, count, buffer)
            weight = self.weights[i]
            if first is not None:
                # The first two blocks summed in one pass: no copy of the first into `block`.
                torch.add(first, x, out=block)
                self._done(0, key, start, count, first)
                first = None
            elif i == 0:
                pairs = self.uniform and len(self.members) > 1
                if pairs and x.dtype == acc_dtype and not self._in_scratch(x):
                    first = x  # still valid when member 1 is read: a mapping, or a ring buffer in use
                    continue
                if self.uniform:
                    block.copy_(x)
                elif x.dtype == acc_dtype:
                    torch.mul(x, weight, out=block)
                else:
                    # Widen first: a bf16 product would be rounded before it is stored.
                    block.copy_(x)
                    block.mul_(weight)
            elif self.uniform:
                block.add_(x)
            else:
                block.add_(x, alpha=weight)
            self._done(i, key, start, count, x)
            del x
        if self.uniform:
            block.div_(len(self.members))

    def _done(self, index: int, key: str, start: int, count: int, x: torch.Tensor) -> None:
        """Member `index`'s block has been added: hash it, then drop its pages (or drop them now)."""
        if self._hasher is not None:
            self._hasher.feed(index, key, start, count, x)  # releases the block once hashed
        else:
            self.members[index].source.release_block(key, start, count)
        if self.progress is not None:
            self.progress(count * x.element_size())

    def _in_scratch(self, x: torch.Tensor) -> bool:
        return x.untyped_storage().data_ptr() == self._scratch.untyped_storage().data_ptr()

    def _check_and_cast(
        self, plan: KeyPlan, block: torch.Tensor, cast: torch.Tensor | None, finite: bool
    ) -> bool:
        """Cast a summed block into the output dtype (when it is narrower); False once any
        block of the key held a NaN or inf (the caller names the member after the key)."""
        check = self.options.check_finite
        # One reduction while the block is in cache: the sum is finite when every
        # value is (a NaN or inf in any member reaches the accumulator).
        if check and finite and not math.isfinite(abs(complex(block.sum().item()))):
            finite = bool(torch.isfinite(block).all())
        if cast is not None:
            cast.copy_(block)
            if check and finite and cast.dtype.is_floating_point and not bool(torch.isfinite(cast).all()):
                raise NonFiniteValues(
                    f"{plan.key!r}: the average overflows {dtype_name(cast.dtype)}; "
                    "write a wider dtype (--dtype float32)"
                )
        return finite

    def write_to(self, writer: SafetensorsWriter) -> None:
        """Average every key into `writer`'s file: each block of a floating key is written as
        soon as it is summed (by a thread, while the next one is summed), so nothing as large
        as a tensor is ever allocated. Fresh memory is what costs here: a buffer the size of the
        largest tensor, touched for the first time, can take as long as the average itself."""
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # see stream()
        try:
            with _BlockWriter(writer, self.plan) as out:
                for key in writer.order:
                    plan = self.plan.keys[key]
                    if plan.kind is not Kind.FLOAT:
                        out.whole(key, self._int(plan))
                        continue
                    finite = True
                    itemsize = plan.out_dtype.itemsize
                    for start in range(0, plan.info.numel, BLOCK):
                        count = min(BLOCK, plan.info.numel - start)
                        block, cast = out.slot(plan, count)
                        self._sum_block(plan, start, count, block)
                        finite = self._check_and_cast(plan, block, cast, finite)
                        out.submit(key, start * itemsize, cast if cast is not None else block)
                    if plan.info.numel == 0:
                        out.slot(plan, 0)  # a slot of its own: the one before may still be writing
                        out.submit(key, 0, None)
                    self._release(key)
                    if not finite:
                        out.drain()
                        self._explain_non_finite(key)
        finally:
            torch.set_num_threads(threads)

    def _explain_non_finite(self, key: str) -> None:
        for i, member in enumerate(self.members):
            tensor = read_into(member.source, key, self._scratch)
            bad = ~torch.isfinite(tensor)
            if bool(bad.any()):
                count = int(bad.sum())
                kind = "NaN" if bool(torch.isnan(tensor).any()) else "inf"
                raise NonFiniteValues(
                    f"{member.label}: {key!r} holds {count} non-finite value(s) ({kind}); "
                    "leave this checkpoint out of the average"
                )
            del tensor
            self.members[i].source.release(key)
        raise NonFiniteValues(
            f"{key!r}: the weighted sum overflows; accumulate in float64 (accumulate='float64', "
            "--accumulate float64)"
        )

    def _int(self, plan: KeyPlan) -> torch.Tensor:
        key = plan.key
        return combine_ints(
            self.options.policy,
            key,
            count=len(self.members),
            read=lambda i: self._read(i, key),
            release=lambda i: self.members[i].source.release(key),
            labels=[m.label for m in self.members],
            newest=self.plan.newest,
            weights=None if self.uniform else self.weights,
        )


class _BlockWriter:
    """Writes summed blocks into a `SafetensorsWriter` from one thread, through a small ring of
    block buffers: a buffer is handed out again only once its block is written."""

    SLOTS = 8

    def __init__(self, writer: SafetensorsWriter, plan: Plan) -> None:
        self.writer = writer
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ladle-write")
        wide = max((p.acc_dtype.itemsize for p in plan.keys.values() if p.acc_dtype is not None), default=4)
        self._accs = [torch.empty(BLOCK * wide, dtype=torch.uint8) for _ in range(self.SLOTS)]
        self._outs = [torch.empty(BLOCK * wide, dtype=torch.uint8) for _ in range(self.SLOTS)]
        self._busy: list[Future[None] | None] = [None] * self.SLOTS
        self._turn = 0

    def __enter__(self) -> _BlockWriter:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        try:
            if exc_type is None:
                self.drain()
        finally:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def slot(self, plan: KeyPlan, count: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The next free buffers for `count` elements of a key: (accumulator block, output
        block when the output dtype is narrower, else None)."""
        self._turn = (self._turn + 1) % self.SLOTS
        pending = self._busy[self._turn]
        if pending is not None:
            self._busy[self._turn] = None
            pending.result()
        acc_dtype = plan.acc_dtype
        assert acc_dtype is not None
        block = self._accs[self._turn][: count * acc_dtype.itemsize].view(acc_dtype)
        if plan.out_dtype == acc_dtype:
            return block, None
        return block, self._outs[self._turn][: count * plan.out_dtype.itemsize].view(plan.out_dtype)

    def submit(self, key: str, byte_start: int, block: torch.Tensor | None) -> None:
        data = tensor_bytes(block) if block is not None else memoryview(b"")
        self._busy[self._turn] = self._pool.submit(self.writer.write_block, key, byte_start, data)

    def whole(self, key: str, tensor: torch.Tensor) -> None:
        self.drain()
        self.writer.write(key, tensor)

    def drain(self) -> None:
        """Wait for every block handed over (the first write error is raised here)."""
        for i, pending in enumerate(self._busy):
            if pending is not None:
                self._busy[i] = None
                pending.result()


__all__ = ["BLOCK", "Averager", "Progress"]
