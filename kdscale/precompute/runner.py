"""Run the precompute on Ray: a pool of teacher-replica actors works through the plan's shard
tasks; the driver records each finished shard in the ledger and commits the manifest last.

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
import torch

from kdscale import fs
from kdscale.cache.format import MANIFEST, CacheFormatError, Manifest, ShardRecord
from kdscale.cache.reader import open_manifest
from kdscale.cache.store import CacheWriter
from kdscale.config import JobSpec
from kdscale.precompute.plan import PrecomputePlan, ShardTask
from kdscale.precompute.worker import StageWorker, TeacherWorker
from kdscale.progress import bar, say

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
    spec: JobSpec, plan: PrecomputePlan, cache_uri: str, reuse: Manifest | None = None
) -> PrecomputeResult:
    """Compute the plan's shards and commit the cache; ``reuse``: this job's cache, already
    committed and verified (:func:`existing_cache`), which is returned untouched."""
    started = time.perf_counter()
    manifest = (
        reuse if reuse is not None else existing_cache(cache_uri, plan.cache_id, spec.cache.verify_before_training)
    )
    if manifest is not None:
        say(f"[green]Cache {plan.cache_id} already complete at {cache_uri} and verified: reusing it, no teacher work.")
        return PrecomputeResult(cache_uri, manifest, True, 0.0, 0)

    with CacheWriter(cache_uri, plan.cache_id, plan.rank_order) as cache:
        todo = [t for t in plan.tasks if t.name not in cache.finished]
        if cache.finished:
            say(f"Resuming cache {plan.cache_id}: {len(cache.finished)} of {len(plan.tasks)} shards already finished.")
        tokens_todo = sum(t.tokens for t in todo)
        compute_seconds = _run_tasks(spec, plan, cache_uri, todo, tokens_todo, cache.record) if todo else 0.0
        manifest, stale = cache.commit(
            targets=plan.targets,
            teacher=plan.teacher,
            tokenizer=plan.tokenizer,
            dataset=plan.dataset,
            order=[t.name for t in plan.tasks],
        )
    if stale:  # every shard is written: these were left by writers killed in an earlier run
        say(f"Removed {stale} temp file(s) left by an interrupted run.")
    say(
        f"[green]Cache {plan.cache_id} committed: {manifest.totals['tokens']:,} tokens, "
        f"{manifest.totals['bytes_per_token']:.1f} B/token, at {cache_uri}"
    )
    return PrecomputeResult(cache_uri, manifest, False, time.perf_counter() - started, tokens_todo, compute_seconds)


class _LastStage(TeacherWorker):
    """Ray-side shim: resolve the upstream stage's hidden states as they arrive, one
    micro-batch at a time, so this stage starts before the whole shard has passed upstream."""

    def run_from(self, task, refs):
        return self.run(task, (ray.get(ref) for ref in refs))


@dataclass
class _Pipeline:
    """One teacher replica: a single actor, or S stage actors (first .. last)."""

    stages: list[Any]  # StageWorker actor handles, first to second-to-last
    last: Any  # the TeacherWorker actor handle that writes shards
    batch_size: int = 1

    def submit(self, task) -> ray.ObjectRef:
        if not self.stages:
            return self.last.run.remote(task)
        refs = []
        ids = torch.from_numpy(np.asarray(task.input_ids, dtype=np.int64))
        for batch in ids.split(self.batch_size):
            ref = batch
            for stage in self.stages:
                ref = stage.forward.remote(ref)
            refs.append(ref)
        return self.last.run_from.remote(task, refs)

    def actors(self) -> list:
        return [*self.stages, self.last]


def _start_pipelines(spec: JobSpec, plan: PrecomputePlan, cache_uri: str, replicas: int) -> list[_Pipeline]:
    t = spec.teacher
    options = {"num_cpus": t.num_cpus, "num_gpus": t.num_gpus, "max_restarts": 0}
    common = {"vocab_size": plan.tokenizer.vocab_size, "seed": spec.seed}
    ranges = plan.layer_ranges
    last_kwargs = {
        **common,
        "targets": plan.targets,
        "cache_uri": cache_uri,
        "rank": plan.rank,
        "compression_level": spec.cache.compression_level,
        "task": plan.dataset.task,
    }
    pipelines = []
    for _ in range(replicas):
        if len(ranges) == 1:
            last: Any = ray.remote(TeacherWorker).options(**options).remote(t, **last_kwargs)
            pipelines.append(_Pipeline([], last, t.batch_size))
            continue
        stages = [ray.remote(StageWorker).options(**options).remote(t, **common, layer_range=r) for r in ranges[:-1]]
        last = ray.remote(_LastStage).options(**options).remote(t, **last_kwargs, layer_range=ranges[-1])
        pipelines.append(_Pipeline(stages, last, t.batch_size))
    return pipelines


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


def _run_tasks(
    spec: JobSpec,
    plan: PrecomputePlan,
    cache_uri: str,
    todo: list[ShardTask],
    tokens_todo: int,
    record: Callable[[ShardRecord], None],
) -> float:
    """Run shard tasks on a pool of teacher replicas (each one actor, or a pipeline of stage
    actors when the teacher is sharded), keeping each replica busy with a short queue; each
    finished shard goes to ``record`` as it lands. Returns the compute seconds."""
    t = spec.teacher
    replicas = min(t.replicas, len(todo))
    pipelines = _start_pipelines(spec, plan, cache_uri, replicas)
    actors = [a for p in pipelines for a in p.actors()]
    queue = list(todo)
    in_flight: dict[ray.ObjectRef, tuple[_Pipeline, ShardTask]] = {}
    shape = f"{replicas} x {len(plan.layer_ranges)} stages" if len(plan.layer_ranges) > 1 else f"x{replicas}"
    with bar("tok") as progress:
        task_id = progress.add_task(f"teacher {shape} ({t.name})", total=tokens_todo, rate=0.0)
        _wait_ready(spec, actors)  # loading counts as setup, not throughput
        first = time.perf_counter()
        done_tokens = 0

        def submit(pipeline: _Pipeline) -> None:
            task = queue.pop(0)
            in_flight[pipeline.submit(task)] = (pipeline, task)

        for pipeline in pipelines:
            for _ in range(IN_FLIGHT_PER_REPLICA):
                if queue:
                    submit(pipeline)
        while in_flight:
            ready, _ = ray.wait(list(in_flight), num_returns=1)
            pipeline, task = in_flight.pop(ready[0])
            record(ray.get(ready[0]))
            done_tokens += task.tokens
            progress.update(task_id, advance=task.tokens, rate=done_tokens / max(time.perf_counter() - first, 1e-9))
            if queue:
                submit(pipeline)
        compute_seconds = time.perf_counter() - first
    for a in actors:
        ray.kill(a)
    return compute_seconds
