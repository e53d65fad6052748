"""Can the cluster hold a job's actors and workers? Checked before any work, so an impossible
request fails with a message naming the resource instead of waiting forever.

Ray queues an actor whose resources no node has and never says so: ``teacher.num_cpus: 64`` on
this 2-CPU machine, or ``num_gpus: 1`` without a GPU, left ``kdscale run`` waiting with its MLflow
runs RUNNING. Pure functions of the spec and a :class:`Capacity` (measured in kdscale.ray_runtime).
"""

from __future__ import annotations

from dataclasses import dataclass

from kdscale.config import JobSpec, StudentSpec

# Ray Data's file-listing task needs one whole CPU that training workers do not hold.
DATA_CPUS = 1.0


@dataclass(frozen=True)
class Capacity:
    """What a job can be placed on: totals, and the largest single node (an actor or worker
    needing more than any one node has can never start, however large the cluster)."""

    cpus: float
    gpus: float
    node_cpus: float
    node_gpus: float
    where: str  # "the Ray cluster" / "this machine (local Ray)"


def teacher_problems(spec: JobSpec, cap: Capacity) -> list[tuple[str, str]]:
    """The precompute's replicas x shards teacher actors, each with the spec's CPUs and GPUs."""
    t = spec.teacher
    actors = t.replicas * t.shards
    problems = []
    for name, each, node, total in (
        ("num_cpus", t.num_cpus, cap.node_cpus, cap.cpus),
        ("num_gpus", t.num_gpus, cap.node_gpus, cap.gpus),
    ):
        if each > node:
            problems.append(
                (
                    f"teacher.{name}",
                    f"each teacher actor asks for {each:g} "
                    f"{name.removeprefix('num_').upper()}, but no node of {cap.where} has more than {node:g}",
                )
            )
        elif each * actors > total:
            problems.append(
                (
                    f"teacher.{name}",
                    f"{t.replicas} replicas x {t.shards} shards = {actors} actors x "
                    f"{each:g} = {each * actors:g} {name.removeprefix('num_').upper()}, but {cap.where} "
                    f"has {total:g}; lower teacher.replicas or teacher.{name}",
                )
            )
    return problems


def student_problems(spec: JobSpec, index: int, cap: Capacity) -> list[tuple[str, str]]:
    """A student's training workers (and Ray Data's reader, which needs a CPU of its own)."""
    s = spec.students[index]
    where_ = f"students.{index}.train"
    problems = []
    need = s.train.num_workers * s.train.cpus_per_worker + DATA_CPUS
    if s.train.cpus_per_worker > cap.node_cpus:
        problems.append(
            (
                f"{where_}.cpus_per_worker",
                f"{s.train.cpus_per_worker:g} CPUs per worker, but no node of "
                f"{cap.where} has more than {cap.node_cpus:g}",
            )
        )
    elif need > cap.cpus:
        problems.append(
            (
                f"{where_}.num_workers",
                f"{s.train.num_workers} workers x {s.train.cpus_per_worker:g} CPU + "
                f"{DATA_CPUS:g} CPU for reading the cache = {need:g} CPUs, but {cap.where} has {cap.cpus:g}",
            )
        )
    if s.train.use_gpu and s.train.num_workers > cap.gpus:
        problems.append(
            (f"{where_}.use_gpu", f"{s.train.num_workers} GPU workers, but {cap.where} has {cap.gpus:g} GPUs")
        )
    return problems


@dataclass(frozen=True)
class Demand:
    """What one student's training holds while it runs: its workers' CPUs and GPUs."""

    cpus: float
    gpus: float


def student_demand(s: StudentSpec) -> Demand:
    t = s.train
    return Demand(t.num_workers * t.cpus_per_worker, float(t.num_workers) if t.use_gpu else 0.0)


def room_for(running: list[Demand], new: Demand, cap: Capacity, limit: int | None) -> bool:
    """May a student start beside the ``running`` ones? Alone, always (the resource check before
    any work has passed it); beside others, only within ``limit`` and when all of them together
    still leave :data:`DATA_CPUS` free: Ray Data's read tasks need a whole CPU, and students whose
    workers held every CPU would wait forever for their batches."""
    if not running:
        return True
    if limit is not None and len(running) >= limit:
        return False
    cpus = sum(d.cpus for d in running) + new.cpus
    gpus = sum(d.gpus for d in running) + new.gpus
    return cpus + DATA_CPUS <= cap.cpus + 1e-9 and gpus <= cap.gpus + 1e-9


def most_at_once(demands: list[Demand], cap: Capacity, limit: int | None) -> int:
    """The most students that train together when each starts, in the listed order, as soon as
    :func:`room_for` allows: the longest run of consecutive students that fit beside each other."""
    best = 0
    for first in range(len(demands)):
        end = first + 1
        while end < len(demands) and room_for(demands[first:end], demands[end], cap, limit):
            end += 1
        best = max(best, end - first)
    return best


def parallel_limit(spec: JobSpec) -> int | None:
    """``parallel_students`` as a cap on students at once (None: the cluster's room alone)."""
    return None if spec.parallel_students == "auto" else spec.parallel_students


def students_at_once(spec: JobSpec, cap: Capacity) -> str:
    """How many of the job's students may train at once, and what bounds it (said at the start of
    training and in the dry run's plan)."""
    limit = parallel_limit(spec)
    most = most_at_once([student_demand(s) for s in spec.students], cap, limit)
    if most > 1:
        return f"up to {most} at once ({cap.cpus:g} CPUs, {cap.gpus:g} GPUs in {cap.where}; one CPU kept for reading)"
    why = "parallel_students: 1" if limit == 1 else f"{cap.where} holds one at a time beside a CPU for reading"
    return f"one after another ({why})"
