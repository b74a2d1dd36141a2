"""The rank-process harness and the collectives the model shards run (gloo, two processes)."""

from __future__ import annotations

from functools import partial

import pytest

from gemma4.parallel.procs import RankError, RankFailed, RankProcesses
from parallel_ranks import make_broken_rank, make_gloo_rank


@pytest.fixture(scope="module")
def ranks():
    procs = RankProcesses(2, partial(make_gloo_rank, 2), env={"OMP_NUM_THREADS": "1"})
    yield procs
    procs.close(timeout_s=10)


def test_all_reduce_sums_over_ranks(ranks: RankProcesses) -> None:
    assert ranks.call("all_reduce", [1.0, 2.0]) == [[3.0, 6.0], [3.0, 6.0]]


@pytest.mark.parametrize("dim", [0, -1])
def test_all_gather_concatenates_in_rank_order(ranks: RankProcesses, dim: int) -> None:
    out = ranks.call("all_gather", 3, dim)
    assert out[0] == out[1]
    if dim == 0:
        assert out[0] == [[0.0, 0.0], [1.0, 1.0], [2.0, 2.0], [1.0, 1.0], [2.0, 2.0], [3.0, 3.0]]
    else:
        assert out[0] == [[0.0, 0.0, 1.0, 1.0], [1.0, 1.0, 2.0, 2.0], [2.0, 2.0, 3.0, 3.0]]


def test_a_rank_that_raises_is_reported_and_the_group_keeps_serving(ranks: RankProcesses) -> None:
    with pytest.raises(RankError, match="rank 1 fails on purpose"):
        ranks.call("fail", 1)
    assert ranks.call("fail", 5) == [0, 1]  # no stale answer was left behind
    assert ranks.call("all_reduce", [1.0]) == [[3.0], [3.0]]


def test_a_dead_rank_fails_the_call_at_once() -> None:
    procs = RankProcesses(2, partial(make_gloo_rank, 2), env={"OMP_NUM_THREADS": "1"})
    try:
        procs.kill(1)
        with pytest.raises(RankFailed, match="rank 1 of 2"):
            procs.call("all_reduce", [1.0], timeout_s=60)  # rank 0 blocks in the collective; the call does not
    finally:
        procs.close(timeout_s=5)


def test_a_rank_that_raises_while_the_others_wait_in_a_collective_stops_the_group(monkeypatch) -> None:
    monkeypatch.setattr(RankProcesses, "ERROR_GRACE_S", 2.0)
    procs = RankProcesses(2, partial(make_gloo_rank, 2), env={"OMP_NUM_THREADS": "1"})
    try:
        with pytest.raises(RankError, match=r"fails before the collective(.|\n)*ranks \[1\] were stuck"):
            procs.call("fail_before_collective", 0)
        assert not procs.alive()
    finally:
        procs.close(timeout_s=5)


def test_a_factory_that_fails_stops_start_up() -> None:
    with pytest.raises(RankError, match="rank 1 cannot start"):
        RankProcesses(2, make_broken_rank, start_timeout_s=60)
