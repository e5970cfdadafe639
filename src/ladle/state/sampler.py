"""Data position that survives a restart: a resumed run sees exactly the batches it would have.

`ResumableSampler` draws a fresh permutation per epoch from `(seed, epoch)` alone,
so the order does not depend on any global RNG, and it can start in the middle of
an epoch. `ResumableDataLoader` is a DataLoader over such a sampler that counts the
batches as the training loop *consumes* them (worker prefetching does not skew the
count), and advances the epoch by itself when a pass completes.

With `num_replicas=` and `rank=` either one works as a `DistributedSampler`: each
rank sees its share of the same per-epoch permutation. Positions are per rank; a
run resumed on another number of ranks continues from the same global position.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sized
from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler

from ladle.errors import ConfigError, StateMismatch

log = logging.getLogger("ladle")


class ResumableSampler(Sampler[int]):
    """Seeded per-epoch shuffle (or sequential order) that can start at any offset.

    With a plain DataLoader and `num_workers=0`, the sampler's own count of yielded
    indices is exact; with worker processes use `ResumableDataLoader`, which counts
    consumed batches instead.
    """

    def __init__(
        self,
        data_source: Sized | int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
    ) -> None:
        self.length = data_source if isinstance(data_source, int) else len(data_source)
        if self.length < 0:
            raise ConfigError(f"data_source length must be >= 0, got {self.length}")
        if (num_replicas is None) != (rank is None):
            raise ConfigError("pass both num_replicas= and rank= (as to a DistributedSampler), or neither")
        self.num_replicas = 1 if num_replicas is None else int(num_replicas)
        self.rank = 0 if rank is None else int(rank)
        if self.num_replicas < 1 or not 0 <= self.rank < self.num_replicas:
            raise ConfigError(f"rank={rank} and num_replicas={num_replicas}: need 0 <= rank < num_replicas")
        self.shuffle = shuffle
        self.seed = int(seed)
        self.epoch = 0
        self.offset = 0  # indices of the current epoch already consumed

    def __len__(self) -> int:
        return -(-self.length // self.num_replicas)

    def set_epoch(self, epoch: int) -> None:
        """Start `epoch` from its beginning (unless a resumed offset is pending for it)."""
        if epoch != self.epoch:
            self.epoch = int(epoch)
            self.offset = 0

    def order(self, epoch: int) -> list[int]:
        """This rank's index order of `epoch` (the whole order without replicas).

        Like `DistributedSampler`: one permutation for all ranks, padded by wrapping
        around to a multiple of `num_replicas`, and rank r takes every r-th index.
        """
        if not self.shuffle:
            order = list(range(self.length))
        else:
            generator = torch.Generator()
            generator.manual_seed(self.seed * 1_000_003 + epoch)
            order = torch.randperm(self.length, generator=generator).tolist()
        if self.num_replicas == 1 or not order:
            return order
        total = len(self) * self.num_replicas
        order += (order * (total // len(order) + 1))[: total - len(order)]
        return order[self.rank :: self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        epoch, start = self.epoch, self.offset
        for position, index in enumerate(self.order(epoch)[start:], start=start + 1):
            self.offset = position
            yield index
        # A completed pass moves to the next epoch, so the next iter() starts it.
        if self.epoch == epoch:
            self.epoch, self.offset = epoch + 1, 0

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "offset": self.offset,
            "seed": self.seed,
            "length": self.length,
            "shuffle": self.shuffle,
            "num_replicas": self.num_replicas,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state["length"]) != self.length:
            raise StateMismatch(
                f"sampler was saved over {state['length']} samples but the dataset now has "
                f"{self.length}; resume with the same dataset or start a new run"
            )
        self.seed = int(state["seed"])
        self.shuffle = bool(state["shuffle"])
        self.epoch = int(state["epoch"])
        self.offset = self.rescaled(int(state["offset"]), int(state.get("num_replicas", 1)))

    def rescaled(self, offset: int, saved_replicas: int) -> int:
        """A per-rank position saved with `saved_replicas` ranks, as a position on this many ranks.

        All ranks consume in lockstep, so the epoch's global position is
        `offset * saved_replicas`; a resharded resume continues from there.
        """
        if saved_replicas == self.num_replicas:
            return offset
        position = offset * saved_replicas
        if position % self.num_replicas:
            log.warning(
                "data position %d of %d ranks does not divide among %d ranks; %d samples are seen again",
                position,
                saved_replicas,
                self.num_replicas,
                position % self.num_replicas,
            )
        return position // self.num_replicas


class ResumableDataLoader(DataLoader):  # type: ignore[type-arg]
    """A DataLoader whose position (epoch, batches consumed) is saved and restored.

    Use it like `DataLoader(dataset, batch_size=..., shuffle=...)` plus `seed=`; hand
    it to the manager (`CheckpointManager(..., data=loader)`) and a resumed run
    continues with the next unseen batch of the interrupted epoch.
    """

    def __init__(
        self,
        dataset: Any,
        *,
        batch_size: int = 1,
        shuffle: bool = False,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
        **kwargs: Any,
    ) -> None:
        for forbidden in ("sampler", "batch_sampler"):
            if kwargs.get(forbidden) is not None:
                raise ConfigError(f"ResumableDataLoader makes its own {forbidden}; do not pass one")
        sampler = ResumableSampler(dataset, shuffle=shuffle, seed=seed, num_replicas=num_replicas, rank=rank)
        # DataLoader draws a base seed for its workers at every iter(); from the global
        # RNG that draw would differ between a resumed and an uninterrupted run, so it
        # comes from a private generator re-seeded from (seed, epoch) at each pass.
        kwargs.setdefault("generator", torch.Generator())
        super().__init__(dataset, batch_size=batch_size, sampler=sampler, **kwargs)
        self.resumable_sampler = sampler
        # The loader, not the sampler, owns the position: workers pull indices ahead of
        # the loop, so only batches handed to the loop count as consumed.
        self._epoch = 0
        self._consumed = 0

    @property
    def epoch(self) -> int:
        return self._epoch

    def set_epoch(self, epoch: int) -> None:
        """Start `epoch` from its beginning (a no-op for the epoch already in progress)."""
        if epoch != self._epoch:
            self._epoch = int(epoch)
            self._consumed = 0

    def __iter__(self) -> Iterator[Any]:
        sampler = self.resumable_sampler
        if self._consumed and self._consumed >= len(self):
            # The last pass was consumed but not run to exhaustion (Lightning stops after
            # len() batches), so the code after its loop never advanced the epoch.
            self._epoch, self._consumed = self._epoch + 1, 0
        epoch = self._epoch
        sampler.epoch, sampler.offset = epoch, self._consumed * self._batch
        if self.generator is not None:
            self.generator.manual_seed(sampler.seed * 1_000_003 + epoch + 7919)
        for batch in super().__iter__():
            self._consumed += 1
            yield batch
        self._epoch, self._consumed = epoch + 1, 0

    @property
    def _batch(self) -> int:
        return int(self.batch_size or 1)

    def state_dict(self) -> dict[str, Any]:
        state = self.resumable_sampler.state_dict()
        state.update(
            epoch=self._epoch,
            offset=self._consumed * self._batch,
            batches=self._consumed,
            batch_size=self._batch,
        )
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state.get("batch_size", self._batch)) != self._batch:
            raise StateMismatch(
                f"data loader was saved with batch_size={state['batch_size']} but now has "
                f"batch_size={self.batch_size}; use the same batch size to resume mid-epoch"
            )
        self.resumable_sampler.load_state_dict(state)
        self._epoch = int(state["epoch"])
        self._consumed = self.resumable_sampler.offset // self._batch
