"""Data position: a resumed loader yields exactly the batches the uninterrupted one would."""

from __future__ import annotations

import pytest

import ladle
from ladle.errors import StateMismatch


def batches(loader) -> list[list[int]]:
    return [b.tolist() for b in loader]


def test_each_epoch_is_a_different_seeded_permutation() -> None:
    loader = ladle.ResumableDataLoader(list(range(10)), batch_size=10, shuffle=True, seed=1)
    first, second = batches(loader), batches(loader)
    assert sorted(first[0]) == list(range(10)) and first != second
    again = ladle.ResumableDataLoader(list(range(10)), batch_size=10, shuffle=True, seed=1)
    assert batches(again) == first


def test_shuffle_false_keeps_order() -> None:
    loader = ladle.ResumableDataLoader(list(range(5)), batch_size=2)
    assert batches(loader) == [[0, 1], [2, 3], [4]]


@pytest.mark.parametrize("stop_after", [0, 1, 3, 5])
def test_resume_mid_epoch_yields_the_remaining_batches(stop_after: int) -> None:
    reference = ladle.ResumableDataLoader(list(range(23)), batch_size=4, shuffle=True, seed=5)
    expected = batches(reference) + batches(reference)
    loader = ladle.ResumableDataLoader(list(range(23)), batch_size=4, shuffle=True, seed=5)
    seen = []
    if stop_after:
        for batch in loader:  # a batch handed to the loop counts as consumed
            seen.append(batch.tolist())
            if len(seen) == stop_after:
                break
    state = loader.state_dict()
    resumed = ladle.ResumableDataLoader(list(range(23)), batch_size=4, shuffle=True, seed=0)
    resumed.load_state_dict(state)
    seen += batches(resumed) + batches(resumed)
    assert seen == expected


def test_worker_prefetching_does_not_skew_the_position() -> None:
    loader = ladle.ResumableDataLoader(list(range(40)), batch_size=4, shuffle=True, seed=2, num_workers=2)
    iterator = iter(loader)
    consumed = [next(iterator).tolist() for _ in range(3)]
    state = loader.state_dict()
    del iterator
    assert state["batches"] == 3
    resumed = ladle.ResumableDataLoader(list(range(40)), batch_size=4, shuffle=True, seed=2)
    resumed.load_state_dict(state)
    full = batches(ladle.ResumableDataLoader(list(range(40)), batch_size=4, shuffle=True, seed=2))
    assert consumed + batches(resumed) == full


def test_a_different_dataset_size_is_refused() -> None:
    loader = ladle.ResumableDataLoader(list(range(10)), batch_size=2)
    other = ladle.ResumableDataLoader(list(range(12)), batch_size=2)
    with pytest.raises(StateMismatch, match="saved over 10 samples but the dataset now has 12"):
        other.load_state_dict(loader.state_dict())


def test_a_different_batch_size_is_refused() -> None:
    loader = ladle.ResumableDataLoader(list(range(10)), batch_size=2)
    other = ladle.ResumableDataLoader(list(range(10)), batch_size=5)
    with pytest.raises(StateMismatch, match="batch_size=2 but now has batch_size=5"):
        other.load_state_dict(loader.state_dict())


def test_the_sampler_alone_resumes_with_a_plain_dataloader() -> None:
    import torch

    sampler = ladle.ResumableSampler(17, shuffle=True, seed=4)
    loader = torch.utils.data.DataLoader(list(range(17)), batch_size=3, sampler=sampler)
    iterator = iter(loader)
    first = [next(iterator).tolist() for _ in range(2)]
    fresh = ladle.ResumableSampler(17, shuffle=True, seed=4)
    fresh.load_state_dict(sampler.state_dict())
    rest = [b.tolist() for b in torch.utils.data.DataLoader(list(range(17)), batch_size=3, sampler=fresh)]
    full = [
        b.tolist()
        for b in torch.utils.data.DataLoader(
            list(range(17)), batch_size=3, sampler=ladle.ResumableSampler(17, seed=4)
        )
    ]
    assert first + rest == full
