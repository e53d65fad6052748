"""The replica schedule (kdscale.precompute.schedule) on a simulated clock: replicas that run
their queued shards in order at a fixed tokens/s, driven the way the runner drives it (largest
ready shard first; wait for the next completion when the schedule says so)."""

from __future__ import annotations

import heapq

import pytest

from kdscale.precompute.schedule import ReplicaSchedule


def first_come(shards: list[int], speeds: list[float], depth: int = 2) -> float:
    """The runner's former policy: shards in arrival order, each to the first free slot
    (slots listed replica by replica); the makespan."""
    slots = [r for r in range(len(speeds)) for _ in range(depth)]
    busy_until = [0.0] * len(speeds)
    queue_ends: list[tuple[float, int]] = []
    now = 0.0
    for tokens in shards:
        if not slots:
            now, freed = heapq.heappop(queue_ends)
            slots.append(freed)
        r = slots.pop(0)
        busy_until[r] = max(busy_until[r], now) + tokens / speeds[r]
        heapq.heappush(queue_ends, (busy_until[r], r))
    return max(busy_until)


def simulate(shards: list[int], speeds: list[float], depth: int = 2) -> tuple[float, list[list[int]]]:
    """The makespan and which shards each replica ran, under :class:`ReplicaSchedule`."""
    schedule = ReplicaSchedule(len(speeds), depth)
    queues: list[list[int]] = [[] for _ in speeds]
    ran: list[list[int]] = [[] for _ in speeds]
    busy_until = [0.0] * len(speeds)
    ends: list[tuple[float, int]] = []
    now = 0.0

    def complete_next() -> None:
        nonlocal now
        now, r = heapq.heappop(ends)
        ran[r].append(queues[r].pop(0))
        schedule.finished(r, ran[r][-1], now)

    for tokens in sorted(shards, reverse=True):
        while (r := schedule.choose(tokens, now)) is None:
            complete_next()
        schedule.submitted(r, tokens, now)
        queues[r].append(tokens)
        busy_until[r] = max(busy_until[r], now) + tokens / speeds[r]
        heapq.heappush(ends, (busy_until[r], r))
    while ends:
        complete_next()
    return now, ran


def test_the_benchmark_shards_end_together():
    """SmolLM2 at 16,384 tokens: shards of 16, 16, 16, 6 and 10 rows on two replicas. First come
    left one replica with 42 rows and the other with 22; the schedule splits them 32 / 32."""
    shards, speeds = [16, 16, 16, 6, 10], [1.0, 1.0]
    assert first_come(shards, speeds) == 42
    makespan, ran = simulate(shards, speeds)
    assert makespan == 32
    assert sorted(sum(r) for r in ran) == [32, 32]


def test_steady_state_alternates_without_waiting():
    makespan, ran = simulate([16] * 20, [1.0, 1.0])
    assert makespan == 160 and [len(r) for r in ran] == [10, 10]


def test_a_slower_replica_gets_less_work_but_is_never_left_idle():
    """Replica 1 runs at a third of replica 0's speed: it takes fewer shards, and the stage
    ends sooner than handing shards out first come."""
    shards, speeds = [16] * 12, [3.0, 1.0]
    makespan, ran = simulate(shards, speeds)
    assert len(ran[0]) > len(ran[1]) >= 1
    assert makespan < first_come(shards, speeds)
    assert makespan <= 16 * 12 / 4 + 16  # within one shard of a perfect split of the work


def test_an_idle_replica_takes_work_even_when_a_busy_one_would_finish_sooner():
    s = ReplicaSchedule(2, depth=1)
    s.submitted(0, 10, now=0.0)
    s.finished(0, 10, now=1.0)  # replica 0: 10 tokens/s
    s.submitted(0, 10, now=1.0)
    s.submitted(1, 10, now=1.0)
    s.finished(1, 10, now=101.0)  # replica 1: 0.1 tokens/s, now idle
    assert s.choose(10, now=1.5) == 1  # replica 0 is busy (depth 1) and 1 is idle: no waiting


def test_a_full_queue_waits_when_the_free_replica_would_finish_later():
    s = ReplicaSchedule(2, depth=2)
    for r in (0, 1):
        s.submitted(r, 100, now=0.0)
    s.finished(0, 100, now=10.0)  # both at ~10 tokens/s; replica 1 is nearly done with its shard
    s.submitted(0, 100, now=10.0)
    s.submitted(1, 10, now=10.0)
    assert s.choose(50, now=10.0) is None  # replica 1 frees first; replica 0 has 100 tokens ahead
    s.finished(1, 100, now=10.0)
    assert s.choose(50, now=10.0) == 1


def test_bookkeeping_refuses_an_overfull_queue_and_bad_shapes():
    s = ReplicaSchedule(1, depth=1)
    s.submitted(0, 5, now=0.0)
    with pytest.raises(RuntimeError, match="already has 1 shards in flight"):
        s.submitted(0, 5, now=0.0)
    with pytest.raises(ValueError):
        ReplicaSchedule(0, depth=2)
