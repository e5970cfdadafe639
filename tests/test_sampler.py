"""Data position: a resumed loader yields exactly the batches the uninterrupted one would."""

from __future__ import annotations

import pytest

import ladle
from ladle.errors import ConfigError, StateMismatch


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


def test_a_pass_stopped_after_len_batches_still_moves_to_the_next_epoch() -> None:
    # Lightning takes len(loader) batches and never runs the iterator to exhaustion.
    loader = ladle.ResumableDataLoader(list(range(8)), batch_size=4, shuffle=True, seed=1)
    first = iter(loader)
    epoch0 = [next(first).tolist() for _ in range(len(loader))]
    epoch1 = [batch.tolist() for batch in loader]
    assert len(epoch1) == 2 and epoch1 != epoch0 and loader.epoch == 2


def test_replicas_split_one_permutation_like_a_distributed_sampler() -> None:
    import torch

    whole = ladle.ResumableSampler(10, shuffle=True, seed=2).order(0)
    shares = [ladle.ResumableSampler(10, shuffle=True, seed=2, num_replicas=3, rank=r) for r in range(3)]
    assert [len(s) for s in shares] == [4, 4, 4]
    padded = whole + whole[:2]  # DistributedSampler pads by wrapping around
    assert [s.order(0) for s in shares] == [padded[r::3] for r in range(3)]
    reference = torch.utils.data.DistributedSampler(list(range(10)), num_replicas=3, rank=1, shuffle=False)
    plain = ladle.ResumableSampler(10, shuffle=False, num_replicas=3, rank=1)
    assert plain.order(0) == list(reference)


def test_a_position_saved_on_two_ranks_resumes_on_one_at_the_same_global_sample() -> None:
    saved = ladle.ResumableDataLoader(
        list(range(24)), batch_size=2, shuffle=True, seed=5, num_replicas=2, rank=0
    )
    iterator = iter(saved)
    for _ in range(3):  # 3 batches of 2 on each of 2 ranks: 12 samples of the epoch are consumed
        next(iterator)
    single = ladle.ResumableDataLoader(list(range(24)), batch_size=2, shuffle=True, seed=5)
    single.load_state_dict(saved.state_dict())
    rest = [x for batch in single for x in batch.tolist()]
    assert rest == ladle.ResumableSampler(24, shuffle=True, seed=5).order(0)[12:]


def test_replicas_need_both_num_replicas_and_rank() -> None:
    with pytest.raises(ConfigError, match="pass both num_replicas= and rank="):
        ladle.ResumableSampler(10, num_replicas=2)
