"""Run the precompute on Ray: a pool of teacher-replica actors works through shard tasks as the
corpus's units are packed (:mod:`kdscale.precompute.feed`); the driver only schedules, records
each finished shard (and each packed unit) in the ledger, and commits the manifest last. Rows go
from the packing task to the teacher actor through Ray's object store, never through the driver.

Resume and reuse fall out of the commit protocol: a complete cache with the same cache_id is
reused untouched; an unfinished one for the same cache_id skips shards whose ledger entry checks
out (size and sha256); anything else at the URI is refused rather than overwritten.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray

from kdscale import fs
from kdscale.cache import idcodec
from kdscale.cache.format import MANIFEST, SPLITS, CacheFormatError, DatasetInfo, Manifest, UnitRecord, shard_name
from kdscale.cache.reader import open_manifest
from kdscale.cache.store import CacheWriter
from kdscale.config import JobSpec
from kdscale.data.units import Unit
from kdscale.models.shared_weights import export_weights
from kdscale.precompute.feed import Stream, UnitMeta
from kdscale.precompute.plan import PrecomputePlan, ShardTask, check_rows, text_dataset, unit_shard_tasks
from kdscale.precompute.schedule import ReplicaSchedule
from kdscale.precompute.worker import StageWorker, TeacherWorker
from kdscale.progress import bar, say
from kdscale.teachers import backend, load_teacher

IN_FLIGHT_PER_REPLICA = 2


@dataclass
class PrecomputeResult:
    cache_uri: str
    manifest: Manifest
    reused: bool
    seconds: float  # wall time of the stage, teacher loading included
    tokens_computed: int
    compute_seconds: float = 0.0  # from the first task submitted to the last shard written

    @property
    def tokens_per_second(self) -> float:
        return self.tokens_computed / self.compute_seconds if self.compute_seconds > 0 else 0.0


def existing_cache(cache_uri: str, cache_id: str, checksums: bool) -> Manifest | None:
    """A committed cache with this cache_id that passes every check (:func:`kdscale.cache.verify.open_cache`),
    None if none is committed; refuses a different committed cache."""
    from kdscale.cache.verify import open_cache

    if not fs.exists(fs.join(cache_uri, MANIFEST)):
        return None
    manifest = open_manifest(cache_uri)
    if manifest.cache_id != cache_id:
        raise CacheFormatError(
            f"{cache_uri} already holds another cache (cache_id {manifest.cache_id}; this job's is {cache_id}); "
            "point cache.uri elsewhere or delete it"
        )
    return open_cache(cache_uri, checksums=checksums)


def run_precompute(
    spec: JobSpec,
    plan: PrecomputePlan,
    cache_uri: str,
    reuse: Manifest | None = None,
    stream: Stream | None = None,
) -> PrecomputeResult:
    """Compute the plan's shards and commit the cache; ``reuse``: this job's cache, already
    committed and verified (:func:`existing_cache`), which is returned untouched. A text plan
    needs its started ``stream`` (:func:`kdscale.precompute.feed.begin_stream`)."""
    started = time.perf_counter()
    manifest = (
        reuse if reuse is not None else existing_cache(cache_uri, plan.cache_id, spec.cache.verify_before_training)
    )
    if manifest is not None:
        say(f"[green]Cache {plan.cache_id} already complete at {cache_uri} and verified: reusing it, no teacher work.")
        return PrecomputeResult(cache_uri, manifest, True, 0.0, 0)
    if plan.streamed and stream is None:
        raise ValueError("a text precompute needs its started stream of units")
    rank_order = stream.rank_order if stream is not None else plan.rank_order
    with CacheWriter(cache_uri, plan.cache_id, rank_order, plan.token_bytes) as cache:
        runner = _Runner(spec, plan, cache_uri, cache, rank_order)
        if stream is not None:
            dataset, order = runner.run_stream(stream)
        else:
            dataset, order = runner.run_tasks(plan.tasks), [t.name for t in plan.tasks]
        manifest, stale = cache.commit(
            targets=plan.targets, teacher=plan.teacher, tokenizer=plan.tokenizer, dataset=dataset, order=order
        )
    if stale:  # every shard is written: these were left by writers killed in an earlier run
        say(f"Removed {stale} temp file(s) left by an interrupted run.")
    say(
        f"[green]Cache {plan.cache_id} committed: {manifest.totals['tokens']:,} tokens, "
        f"{manifest.totals['bytes_per_token']:.1f} B/token, at {cache_uri}"
    )
    return PrecomputeResult(
        cache_uri, manifest, False, time.perf_counter() - started, runner.tokens_computed, runner.compute_seconds
    )


class _LastStage(TeacherWorker):
    """Ray-side shim: resolve the upstream stage's hidden states as they arrive, one
    micro-batch at a time, so this stage starts before the whole shard has passed upstream."""

    def run_from(self, task, packed, refs):
        return self.run(task, packed, (ray.get(ref) for ref in refs))


@dataclass
class _Pipeline:
    """One teacher replica: a single actor, or S stage actors (first .. last)."""

    stages: list[Any]  # StageWorker actor handles, first to second-to-last
    last: Any  # the TeacherWorker actor handle that writes shards
    batch_size: int = 1
    node: str | None = None  # IP/node-id of the node ``last`` runs on (recorded with its shards)
    weights: ray.ObjectRef | None = None  # the shared weights its actors map: held while they run

    def submit(self, task: ShardTask, packed: ray.ObjectRef | None = None) -> ray.ObjectRef:
        """``packed``: the unit the task's rows are in (Ray hands it to the actors from its
        object store; the driver never holds the rows)."""
        if not self.stages:
            return self.last.run.remote(task, packed)
        refs = []
        first, *later = self.stages
        for start in range(0, task.rows, self.batch_size):
            ref = first.forward_rows.remote(task, packed, start, min(start + self.batch_size, task.rows))
            for stage in later:
                ref = stage.forward.remote(ref)
            refs.append(ref)
        return self.last.run_from.remote(task, packed, refs)

    def actors(self) -> list:
        return [*self.stages, self.last]


# Runs once per precompute; reserves no CPU (teacher actors waiting for its result may hold every
# CPU), and its process exits afterwards so the model it loaded is not kept alive in an idle worker.
@ray.remote(num_cpus=0, max_calls=1)
def _teacher_weights(teacher, vocab_size: int, seed: int, task: str):
    return export_weights(load_teacher(teacher, vocab_size, seed, "cpu", task=task))


def shared_weights(spec: JobSpec, vocab_size: int, task: str, actors: int) -> ray.ObjectRef | None:
    """The teacher's weights in Ray's object store, loaded once, when more than one CPU actor will
    use them and the backend can build a teacher around them (None: each actor loads its own).
    GPU actors load their own: each copies its weights to its device anyway, and a large teacher
    would sit in the object store for nothing."""
    t = spec.teacher
    if actors < 2 or t.num_gpus > 0 or not t.share_weights or not backend(t).shares_weights:
        return None
    return _teacher_weights.remote(t, vocab_size, spec.seed, task)


def _start_pipelines(
    spec: JobSpec, plan: PrecomputePlan, cache_uri: str, replicas: int, rank: np.ndarray
) -> list[_Pipeline]:
    t = spec.teacher
    options = {"num_cpus": t.num_cpus, "num_gpus": t.num_gpus, "max_restarts": 0}
    ranges = plan.layer_ranges
    task = plan.dataset.task if plan.dataset is not None else {"name": "causal_lm"}
    weights = shared_weights(spec, plan.tokenizer.vocab_size, task["name"], replicas * len(ranges))
    common = {"vocab_size": plan.tokenizer.vocab_size, "seed": spec.seed, "weights": weights}
    last_kwargs = {
        **common,
        "targets": plan.targets,
        "cache_uri": cache_uri,
        "rank": rank,
        "compression_level": spec.cache.compression_level,
        "task": task,
    }
    pipelines = []
    for _ in range(replicas):
        if len(ranges) == 1:
            last: Any = ray.remote(TeacherWorker).options(**options).remote(t, **last_kwargs)
            pipelines.append(_Pipeline([], last, t.batch_size, weights=weights))
            continue
        stages = [ray.remote(StageWorker).options(**options).remote(t, **common, layer_range=r) for r in ranges[:-1]]
        last = ray.remote(_LastStage).options(**options).remote(t, **last_kwargs, layer_range=ranges[-1])
        pipelines.append(_Pipeline(stages, last, t.batch_size, weights=weights))
    return pipelines


def actor_nodes(actors: list) -> list[str]:
    """``IP/node-id`` of the node each actor runs on (recorded with every shard it writes; the
    id tells apart nodes that share an address, as on one machine)."""
    node_ids = ray.get([a.__ray_call__.remote(lambda _: ray.get_runtime_context().get_node_id()) for a in actors])
    ips = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes()}
    return [f"{ips.get(node, '?')}/{node[:12]}" for node in node_ids]


class TeacherStartTimeout(RuntimeError):
    pass


def _wait_ready(spec: JobSpec, actors: list) -> None:
    """Wait for every teacher actor to be placed and loaded, at most ``teacher.start_timeout_s``."""
    t = spec.teacher
    try:
        ray.get([a.ready.remote() for a in actors], timeout=t.start_timeout_s)
    except ray.exceptions.GetTimeoutError:
        for a in actors:
            ray.kill(a)
        raise TeacherStartTimeout(
            f"{len(actors)} teacher actors ({t.num_cpus:g} CPU, {t.num_gpus:g} GPU each) were not all placed and "
            f"loaded within teacher.start_timeout_s = {t.start_timeout_s:g} s; the cluster has "
            f"{ray.available_resources().get('CPU', 0):g} CPUs and {ray.available_resources().get('GPU', 0):g} GPUs "
            "free. Lower teacher.replicas / num_cpus / num_gpus, or add nodes"
        ) from None


class _Runner:
    """Teacher replicas working through shard tasks (each replica one actor, or a pipeline of
    stage actors when the teacher is sharded) with a short queue each; every finished shard is
    recorded in the ledger as it lands. Replicas start on the first task, so a resumed cache with
    nothing left to compute loads no teacher."""

    def __init__(self, spec: JobSpec, plan: PrecomputePlan, cache_uri: str, cache: CacheWriter, rank_order):
        self.spec, self.plan, self.cache_uri, self.cache = spec, plan, cache_uri, cache
        self.rank = idcodec.inverse(rank_order)
        self.pipelines: list[_Pipeline] = []
        self.schedule: ReplicaSchedule  # made by _start, once the replica count is known
        self.in_flight: dict[ray.ObjectRef, tuple[int, ShardTask]] = {}
        self.tokens_computed = 0
        self.compute_seconds = 0.0
        self.first = 0.0
        self.on_done: Callable[[ShardTask], None] = lambda task: None

    def _start(self, replicas: int) -> None:
        self.pipelines = _start_pipelines(self.spec, self.plan, self.cache_uri, replicas, self.rank)
        _wait_ready(self.spec, [a for p in self.pipelines for a in p.actors()])  # loading counts as setup
        for pipeline, node in zip(self.pipelines, actor_nodes([p.last for p in self.pipelines])):
            pipeline.node = node
        self.schedule = ReplicaSchedule(len(self.pipelines), IN_FLIGHT_PER_REPLICA)
        self.first = time.perf_counter()

    def _now(self) -> float:
        return time.perf_counter() - self.first

    def submit(self, tasks: list[tuple[ShardTask, ray.ObjectRef | None]], replicas: int | None = None) -> None:
        """Hand ``tasks`` (each with the unit its rows are in, or None) to the replicas, largest
        first, each to the replica :class:`ReplicaSchedule` picks; returns once all are in flight."""
        if not tasks:
            return
        if not self.pipelines:
            self._start(replicas or self.spec.teacher.replicas)
        ready = sorted(tasks, key=lambda tp: -tp[0].tokens)
        while ready:
            task, packed = ready[0]
            replica = self.schedule.choose(task.tokens, self._now())
            if replica is None:
                self._collect()
                continue
            ready.pop(0)
            self.schedule.submitted(replica, task.tokens, self._now())
            self.in_flight[self.pipelines[replica].submit(task, packed)] = (replica, task)

    def _collect(self) -> None:
        ready, _ = ray.wait(list(self.in_flight), num_returns=1)
        replica, task = self.in_flight.pop(ready[0])
        self.cache.record(ray.get(ready[0]).model_copy(update={"node": self.pipelines[replica].node}))
        self.schedule.finished(replica, task.tokens, self._now())
        self.tokens_computed += task.tokens
        self.compute_seconds = self._now()
        self.on_done(task)

    def drain(self) -> None:
        while self.in_flight:
            self._collect()
        for a in (a for p in self.pipelines for a in p.actors()):
            ray.kill(a)

    def run_tasks(self, tasks: list[ShardTask]) -> DatasetInfo:
        """Shard tasks planned up front (images; rows packed by the caller)."""
        todo = [t for t in tasks if t.name not in self.cache.finished]
        if len(todo) < len(tasks):
            say(
                f"Resuming cache {self.plan.cache_id}: "
                f"{len(tasks) - len(todo)} of {len(tasks)} shards already finished."
            )
        with bar("tok") as progress:
            bar_id = progress.add_task(
                f"teacher {self._shape()} ({self.spec.teacher.name})", total=sum(t.tokens for t in todo), rate=0.0
            )
            self.on_done = lambda task: progress.update(bar_id, advance=task.tokens, rate=self._rate())
            self.submit([(task, None) for task in todo], replicas=min(self.spec.teacher.replicas, len(todo)))
            self.drain()
        return self.plan.dataset

    def run_stream(self, stream: Stream) -> tuple[DatasetInfo, list[str]]:
        """Units as they are packed: record each, cut it into shard tasks, keep replicas busy;
        a unit is done when its last shard lands."""
        c, units = self.spec.corpus, self.plan.units or []
        resumed = len(self.cache.finished)
        if resumed:
            say(
                f"Resuming cache {self.plan.cache_id}: {resumed} shards already finished "
                f"({len(self.cache.units)} of {len(units)} input units packed before; each is re-read and checked)."
            )
        records: list[UnitRecord] = []
        next_index: dict[str, int] = {}
        pending: dict[int, int] = {}
        with bar("tok") as progress:
            bar_id = progress.add_task(
                f"teacher {self._shape()} ({self.spec.teacher.name}), units", total=len(units), rate=0.0
            )

            def done(task: ShardTask) -> None:
                unit = task.source.unit
                pending[unit] -= 1
                if not pending[unit]:
                    progress.update(bar_id, advance=1, rate=self._rate())

            self.on_done = done
            for meta, packed in stream.units():
                split_rows = meta.split_rows()
                tasks = unit_shard_tasks(meta.index, split_rows, next_index, self.spec.cache.rows_per_shard, c.seq_len)
                records.append(_unit_record(units[meta.index], meta, split_rows, tasks, c.seq_len))
                self.cache.record_unit(records[-1])
                todo = [t for t in tasks if t.name not in self.cache.finished]
                pending[meta.index] = len(todo)
                if not todo:
                    progress.update(bar_id, advance=1)
                self.submit([(task, packed) for task in todo])
            progress.update(bar_id, total=len(records))  # a max_tokens slice ends before the last unit
            self.drain()
        dataset = text_dataset(self.plan, records)
        check_rows(dataset.rows, dataset.documents, c)
        order = [shard_name(split, i) for split in SPLITS for i in range(next_index.get(split, 0))]
        return dataset, order

    def _rate(self) -> float:
        return self.tokens_computed / max(time.perf_counter() - self.first, 1e-9)

    def _shape(self) -> str:
        stages = len(self.plan.layer_ranges)
        return f"{self.spec.teacher.replicas} x {stages} stages" if stages > 1 else f"x{self.spec.teacher.replicas}"


def _unit_record(
    unit: Unit, meta: UnitMeta, split_rows: dict[str, int], tasks: list[ShardTask], seq_len: int
) -> UnitRecord:
    return UnitRecord(
        index=meta.index,
        pieces=unit.descriptor(),
        content_hash=meta.content_hash,
        documents=meta.documents,
        tokens=meta.rows * seq_len,
        dropped_tokens=meta.dropped_tokens,
        rows={split: n for split, n in split_rows.items() if n},
        shards=[t.name for t in tasks],
    )
