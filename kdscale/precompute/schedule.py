"""Which teacher replica takes the next shard: earliest estimated finish, never a busy queue
over an idle replica. Pure bookkeeping (no Ray), driven by the runner with its clock.

Each replica keeps up to ``depth`` shards in flight, so the next one is already queued when the
current one ends (the driver's round trip stays off the critical path). But a queued shard is
committed to its replica: handing shards out first-come (what the runner did) let one replica end
with two large shards while the other went idle. On SmolLM2 at 16,384 tokens (shards of
16, 16, 16, 6 and 10 rows on 2 replicas) one replica sat idle for 11 of the stage's 24.8 s
(661 tokens/s); with this schedule the two end within 0.6 s of each other (828 tokens/s).

The rule: a shard goes to the replica whose queue is estimated to empty first (its queued tokens,
less the progress of the shard it is on, at its measured tokens/s). When that replica's queue is
full the shard waits for the next completion instead of queueing behind a replica that will be
busy longer, unless some replica is idle: an idle replica always takes work (no throughput is
traded for balance). The runner offers the largest ready shard first, so the small ones fill in
at the end (longest-processing-time order).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field


@dataclass
class _Queue:
    depth: int
    tokens: deque[int] = field(default_factory=deque)  # in-flight shards, in the order they run
    head_started: float = 0.0  # when the shard now running began (estimated: its predecessor's end)
    done_tokens: int = 0
    busy_seconds: float = 0.0

    def rate(self) -> float | None:
        return self.done_tokens / self.busy_seconds if self.busy_seconds > 0 and self.done_tokens else None

    def remaining(self, now: float, rate: float | None) -> float:
        """Tokens still to compute in this queue (the running shard's progress estimated from ``rate``)."""
        if not self.tokens:
            return 0.0
        progress = (now - self.head_started) * rate if rate else 0.0
        head = self.tokens[0]
        return sum(self.tokens) - min(progress, head * 0.99)


class ReplicaSchedule:
    """Which of ``replicas`` replicas (indices) runs the next shard; ``depth`` shards in flight each."""

    def __init__(self, replicas: int, depth: int):
        if replicas < 1 or depth < 1:
            raise ValueError("a schedule needs at least one replica and one shard in flight each")
        self.queues = [_Queue(depth) for _ in range(replicas)]

    def _rate(self, q: _Queue) -> float | None:
        """The replica's measured tokens/s; before its first completion, the others' mean."""
        own = q.rate()
        if own is not None:
            return own
        known = [r for r in (x.rate() for x in self.queues) if r is not None]
        return sum(known) / len(known) if known else None

    def choose(self, tokens: int, now: float) -> int | None:
        """The replica to submit a shard of ``tokens`` to now, or None: wait for a completion."""

        def finish(i: int) -> float:
            q = self.queues[i]
            rate = self._rate(q)
            work = q.remaining(now, rate) + tokens
            return work / rate if rate else work

        best = min(range(len(self.queues)), key=finish)
        if len(self.queues[best].tokens) < self.queues[best].depth:
            return best
        idle = [i for i, q in enumerate(self.queues) if not q.tokens]
        return min(idle, key=finish) if idle else None

    def submitted(self, replica: int, tokens: int, now: float) -> None:
        q = self.queues[replica]
        if len(q.tokens) >= q.depth:
            raise RuntimeError(f"replica {replica} already has {q.depth} shards in flight")
        if not q.tokens:
            q.head_started = now
        q.tokens.append(tokens)

    def finished(self, replica: int, tokens: int, now: float) -> None:
        """A shard of ``tokens`` has landed on ``replica`` (a replica runs its shards in order,
        but two may land between the runner's looks and be seen in either order)."""
        q = self.queues[replica]
        q.tokens.remove(tokens)
        q.done_tokens += tokens
        q.busy_seconds += now - q.head_started
        q.head_started = now
