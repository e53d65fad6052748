"""The thin layer between kdscale and a Ray runtime: connect (or start a local Ray), quiet Ray's
own progress output, and a tiny counter actor that lets workers report progress to the driver."""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

import ray

from kdscale.config import RaySpec
from kdscale.resources import Capacity

# glibc's malloc hands allocations above 32 MB to fresh mmap'd pages, so every step's logits and
# gradients ([batch, seq, vocab] floats: ~200 MB each at vocab 49k) are page-faulted in again, 4 KB
# at a time. Measured here in a training worker: ~100k minor faults/s and ~45% of its CPU time in
# the kernel; a 20-step log_softmax loop went from 25 s / 3.0M faults to 15 s / 56k faults with
# transparent huge pages for malloc. Workers start with it (a tunable unknown to an older glibc is
# ignored; a value the user set is kept).
MALLOC_TUNABLE = "glibc.malloc.hugetlb=1"


# Ray Train's controller looks at its workers every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (Ray's
# default: 2 s), so a finished training run is noticed, and its workers shut down, only at the
# next look. kdscale trains many small students, each its own run: measured on the tiny job
# here, from the workers' return to fit()'s 4.4 s at 2 s, 1.2 s at 0.25 s. A look is one small
# call per worker (64 calls/s for 16 workers at 0.25 s); a value the user set is kept.
TRAIN_HEALTH_CHECK = ("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")

# Ray Train starts a preemption watcher actor (a new process: ~1.6 CPU-seconds on this machine) for
# every training run, which polls Ray for nodes being drained (spot reclaims, autoscaler
# scale-down) so the run can checkpoint before the node goes. A local Ray that kdscale starts for
# itself is this machine alone: nothing drains it, so it runs without one. On a cluster (an
# address given) the watcher stays; a value the user set is kept.
PREEMPTION_WATCHER = ("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")


def worker_env(local: bool = False) -> dict[str, str]:
    """Environment every kdscale Ray worker starts with; ``local``: a Ray kdscale starts itself."""
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.hugetlb" not in tunables:
        tunables = ":".join(t for t in (tunables, MALLOC_TUNABLE) if t)
    env = {"GLIBC_TUNABLES": tunables}
    for name, value in (TRAIN_HEALTH_CHECK, PREEMPTION_WATCHER) if local else (TRAIN_HEALTH_CHECK,):
        env[name] = os.environ.get(name, value)
    return env


def ensure_ray(spec: RaySpec) -> None:
    """Reuse an initialized Ray (tests start one per session), else connect or start a local one.

    ``RAY_ADDRESS`` (set by ``ray job submit``) wins over the spec so the same job runs locally
    and on a cluster unchanged."""
    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS") or spec.address
        kwargs = {"address": address} if address else {"num_cpus": spec.num_cpus, "include_dashboard": False}
        ray.init(
            logging_level=logging.WARNING,
            log_to_driver=spec.log_to_driver,
            runtime_env={"env_vars": worker_env(local=not address)},
            **kwargs,
        )
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    ctx.execution_options.preserve_order = True  # the same seed reads rows in the same order
    # Ray Data's V2 Parquet reader lists a cache's shards again at every execution, reading their
    # footers on a fresh pool of FooterReader actors (new processes) each epoch; V1 reads them
    # once, when the dataset is made. The manifest already names every shard and its rows, so the
    # per-epoch listing buys nothing: measured on the tiny job (2 epochs, 2 cores), a student's
    # training took 23.7 and 25.9 s with V1 against 30.4 and 30.8 s with V2.
    # RAY_DATA_USE_DATASOURCE_V2, if set, wins.
    if "RAY_DATA_USE_DATASOURCE_V2" not in os.environ:
        ctx.use_datasource_v2 = False


def capacity(spec: RaySpec) -> Capacity:
    """The connected cluster's resources; without one (and no address to connect to), what a
    local Ray started by kdscale would have, measured without starting it (so ``--dry-run``
    can check resources for free)."""
    if not ray.is_initialized() and not (os.environ.get("RAY_ADDRESS") or spec.address):
        import torch

        cpus = float(spec.num_cpus or os.cpu_count() or 1)
        gpus = float(torch.cuda.device_count()) if torch.cuda.is_available() else 0.0
        return Capacity(cpus, gpus, cpus, gpus, "this machine (local Ray)")
    ensure_ray(spec)
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    total = ray.cluster_resources()
    return Capacity(
        float(total.get("CPU", 0)),
        float(total.get("GPU", 0)),
        max((float(n.get("CPU", 0)) for n in nodes), default=0.0),
        max((float(n.get("GPU", 0)) for n in nodes), default=0.0),
        "the Ray cluster",
    )


def cluster_cpus() -> float:
    return float(ray.cluster_resources().get("CPU", 0))


def cluster_gpus() -> float:
    return float(ray.cluster_resources().get("GPU", 0))


@ray.remote(num_cpus=0)
class Counter:
    """Workers add what they have done; the driver polls it to draw a progress bar."""

    def __init__(self) -> None:
        self.values: dict[str, float] = {}

    def add(self, key: str, amount: float) -> None:
        self.values[key] = self.values.get(key, 0.0) + amount

    def get(self) -> dict[str, float]:
        return dict(self.values)

    def pop(self, key: str) -> float:
        return self.values.pop(key, 0.0)


_COUNTERS: dict[tuple[str, str], Any] = {}
_COUNTERS_LOCK = threading.Lock()


def progress_counter():
    """This driver's one :class:`Counter` on the connected Ray, made on first use. Each training
    run counts under a key of its own, so a job of many students starts one counter actor, not one
    per student (an actor is a new process: ~1.4 CPU-seconds on this 2-core machine)."""
    ctx = ray.get_runtime_context()
    key = (ctx.gcs_address, ctx.get_job_id())  # a new Ray (or job) gets a new counter
    with _COUNTERS_LOCK:  # students trained at once ask from their own threads
        if key not in _COUNTERS:
            _COUNTERS.clear()
            _COUNTERS[key] = Counter.remote()
        return _COUNTERS[key]
