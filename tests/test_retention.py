"""Retention: a union of small policies; the latest, best and resumed-from always survive."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ladle
from ladle.errors import ConfigError
from ladle.policies.retention import KeepBest, KeepEvery, KeepLast, Record, to_delete


def records(losses: list[float], pinned: frozenset[int] = frozenset()) -> list[Record]:
    return [
        Record(name=f"c{i}", step=(i + 1) * 10, seq=i + 1, metrics={"loss": v}, pinned=i in pinned)
        for i, v in enumerate(losses)
    ]


@pytest.mark.parametrize(
    ("policy", "losses", "kept"),
    [
        (KeepLast(n=2), [5, 4, 3, 2], {"c2", "c3"}),
        (KeepBest(k=2, metric="loss", mode="min"), [5, 1, 3, 2], {"c1", "c3"}),
        (KeepBest(k=1, metric="loss", mode="max"), [5, 1, 3, 2], {"c0"}),
        (KeepBest(k=2, metric="loss", mode="min"), [math.nan, 1, math.inf, 2], {"c1", "c3"}),
        (KeepBest(k=1, metric="loss", mode="min"), [1, 1, 1], {"c0"}),
        (KeepEvery(steps=20), [1, 1, 1, 1], {"c1", "c3"}),
    ],
)
def test_each_policy_keeps_what_it_says(policy, losses, kept) -> None:
    assert policy.keep(records(losses)) == kept


def test_no_policies_keep_everything() -> None:
    assert to_delete(records([1, 2, 3]), [], protected=set()) == []


def test_policies_are_validated() -> None:
    with pytest.raises(ConfigError, match="KeepLast.n=0 is not allowed; use an integer >= 1"):
        KeepLast(n=0)
    with pytest.raises(ConfigError, match="KeepBest.mode='up' is not a direction"):
        KeepBest(k=1, metric="loss", mode="up")
    with pytest.raises(ConfigError, match="Keep\\(best=...\\) needs metric="):
        ladle.Keep(best=2).policies()


finite_or_not = st.one_of(
    st.floats(min_value=-10, max_value=10, allow_nan=False), st.just(math.nan), st.just(math.inf)
)


@settings(max_examples=200, deadline=None)
@given(
    losses=st.lists(finite_or_not, min_size=1, max_size=25),
    last=st.none() | st.integers(1, 5),
    best=st.none() | st.integers(1, 4),
    every=st.none() | st.integers(1, 60),
    mode=st.sampled_from(["min", "max"]),
    resumed=st.integers(0, 24),
    pinned=st.frozensets(st.integers(0, 24), max_size=3),
)
def test_the_kept_set_is_exactly_the_union_plus_protected(
    losses, last, best, every, mode, resumed, pinned
) -> None:
    recs = records(losses, pinned)
    by_metric = {"metric": "loss", "mode": mode} if best else {}
    given = {k: v for k, v in {"last": last, "best": best, "every": every}.items() if v is not None}
    policies = ladle.Keep(**given, **by_metric).policies() if given else []
    latest = recs[-1].name
    scored = [r for r in recs if math.isfinite(r.metrics["loss"])]
    best_rec = (
        min(scored, key=lambda r: (r.metrics["loss"] if mode == "min" else -r.metrics["loss"], r.seq))
        if scored
        else None
    )
    protected = {latest, recs[min(resumed, len(recs) - 1)].name} | ({best_rec.name} if best_rec else set())
    deleted = set(to_delete(recs, policies, protected))
    kept = {r.name for r in recs} - deleted
    assert protected <= kept
    if not policies:
        assert not deleted
        return
    expected = set(protected) | {r.name for r in recs if r.pinned}
    for policy in policies:
        expected |= policy.keep(recs)
    assert kept == expected
    # Cross-check each policy by its definition.
    names_by_seq = [r.name for r in sorted(recs, key=lambda r: r.seq)]
    if last:
        assert set(names_by_seq[-last:]) <= kept
    if every:
        assert {r.name for r in recs if r.step % every == 0} <= kept
    if best:
        ranked = sorted(
            scored, key=lambda r: (r.metrics["loss"] if mode == "min" else -r.metrics["loss"], r.seq)
        )
        assert {r.name for r in ranked[:best]} <= kept


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    losses=st.lists(finite_or_not, min_size=1, max_size=12),
    last=st.integers(1, 3),
    best=st.integers(1, 2),
)
def test_a_real_manager_never_deletes_latest_best_or_resumed_from(
    tmp_path_factory, losses, last, best
) -> None:
    from tests.conftest import tiny_model

    run_dir = tmp_path_factory.mktemp("run")
    model = tiny_model()
    keep = ladle.Keep(last=last, best=best)
    half = len(losses) // 2
    with ladle.CheckpointManager(run_dir, model=model, monitor="loss", mode="min", keep=keep) as manager:
        for step, loss in enumerate(losses[:half], start=1):
            manager.save(step=step, metrics={"loss": loss})
    with ladle.CheckpointManager(run_dir, model=model, monitor="loss", mode="min", keep=keep) as manager:
        point = manager.resume("best") if any(math.isfinite(v) for v in losses[:half]) else manager.resume()
        resumed_from = point.checkpoint.name if point else None
        for step, loss in enumerate(losses[half:], start=half + 1):
            manager.save(step=100 + step, metrics={"loss": loss})
        names = {c.name for c in manager.run.checkpoints()}
        assert manager.latest.name in names
        finite = [(v, i) for i, v in enumerate(losses) if math.isfinite(v)]
        if finite:
            assert manager.best.metrics["loss"] == min(finite)[0]
        if resumed_from:
            assert resumed_from in names
        assert len(names) <= last + best + 2


def test_retention_deletes_only_after_the_new_checkpoint_is_committed(tmp_path: Path, model) -> None:
    with ladle.CheckpointManager(tmp_path / "run", model=model, keep=ladle.Keep(last=1)) as manager:
        manager.save(step=1)
        manager.save(step=2)
        assert [c.step for c in manager.run.checkpoints()] == [2]
