"""The training loop's supports: the prefetcher that reads ahead across epochs, and the malloc setting
every Ray worker starts with."""

from __future__ import annotations

import threading
import time

import pytest

from kdscale.student.loop import _Prefetcher


def _epochs(log: list):
    def make_epoch(epoch: int):
        for i in range(3):
            log.append((threading.current_thread().name, epoch, i))
            yield epoch, i

    return make_epoch


@pytest.mark.parametrize("depth", [0, 1, 4])
def test_prefetcher_gives_each_epoch_its_items_in_order(depth):
    log: list = []
    p = _Prefetcher(_epochs(log), range(2, 5), depth)
    assert [list(p.epoch(e)) for e in range(2, 5)] == [[(e, i) for i in range(3)] for e in range(2, 5)]
    threads = {name for name, _, _ in log}
    assert threads == ({"kdscale-prefetch"} if depth else {threading.current_thread().name})


def test_prefetcher_reads_the_next_epoch_while_this_one_trains():
    log: list = []
    p = _Prefetcher(_epochs(log), range(2), 4)
    first = p.epoch(0)
    next(first)
    deadline = time.time() + 5
    while len(log) < 6 and time.time() < deadline:  # 3 items + end of epoch 0, then epoch 1 begins
        time.sleep(0.01)
    assert (("kdscale-prefetch", 1, 0)) in log  # epoch 1's first read happened during epoch 0
    assert list(first) == [(0, 1), (0, 2)] and list(p.epoch(1)) == [(1, 0), (1, 1), (1, 2)]


def test_prefetcher_raises_the_readers_error_in_the_training_thread():
    def broken(epoch: int):
        yield 1
        raise OSError("shard unreadable")

    p = _Prefetcher(broken, range(1), 2)
    with pytest.raises(OSError, match="shard unreadable"):
        list(p.epoch(0))


def test_workers_start_with_huge_page_malloc_and_keep_the_users_tunables(monkeypatch):
    from kdscale.ray_runtime import MALLOC_TUNABLE, worker_env

    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    monkeypatch.delenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", raising=False)
    monkeypatch.delenv("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", raising=False)
    assert worker_env() == {"GLIBC_TUNABLES": MALLOC_TUNABLE, "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25"}
    # a Ray kdscale starts for itself is one machine that nothing drains: no preemption watcher
    assert worker_env(local=True) == {**worker_env(), "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=2")
    assert worker_env()["GLIBC_TUNABLES"] == f"glibc.malloc.arena_max=2:{MALLOC_TUNABLE}"
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.hugetlb=0")
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "2")
    monkeypatch.setenv("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "1")
    assert worker_env(local=True) == {  # the user's choices win
        "GLIBC_TUNABLES": "glibc.malloc.hugetlb=0",
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "2",
        "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "1",
    }


PROBE = """
import json, sys
from kdscale.config import RaySpec
from kdscale.ray_runtime import ensure_ray
import ray

ensure_ray(RaySpec(num_cpus=1))

@ray.remote
def probe():
    import os, resource, torch
    torch.set_num_threads(1)
    w, x = torch.randn(128, 49152), torch.randn(1024, 128)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        (x @ w).log_softmax(-1)  # 200 MB results: above glibc's mmap threshold
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    names = ("GLIBC_TUNABLES", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER")
    return [faults] + [os.environ.get(name) for name in names]

print(json.dumps(ray.get(probe.remote())))
"""


@pytest.mark.ray
@pytest.mark.slow
def test_a_ray_kdscale_starts_gives_workers_huge_page_malloc(tmp_path):
    """A Ray started by kdscale (its own process: the test session's Ray is already up) runs
    workers with the tunable set at exec, so glibc applies it: five 200 MB results fault in a few
    thousand pages instead of ~250k (4 KB each)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    dropped = ("GLIBC_TUNABLES", "RAY_ADDRESS", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S")
    dropped += ("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER",)
    env = {k: v for k, v in os.environ.items() if k not in dropped}
    proc = subprocess.run(
        [sys.executable, "-c", PROBE],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    faults, tunables, health_check, preemption_watcher = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "glibc.malloc.hugetlb=1" in tunables
    assert health_check == "0.25"  # Ray Train's controller in such a Ray notices a finished run sooner
    assert preemption_watcher == "0"  # and starts no preemption watcher: nothing drains a local Ray
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if thp.exists() and "[never]" not in thp.read_text():
        assert faults < 100_000, faults


@pytest.mark.ray
def test_one_progress_counter_serves_every_training_run_of_a_driver(ray_session):
    """Each training run counts under its own key in the driver's one counter actor (one actor per
    student was one more process per student); a finished run's key is dropped."""
    import ray

    from kdscale.ray_runtime import progress_counter

    counter = progress_counter()
    assert progress_counter() is counter
    ray.get([counter.add.remote("tokens/a/1", 3.0), counter.add.remote("tokens/b/2", 5.0)])
    ray.get(counter.add.remote("tokens/a/1", 4.0))
    values = ray.get(counter.get.remote())
    assert (values["tokens/a/1"], values["tokens/b/2"]) == (7.0, 5.0)
    assert ray.get(counter.pop.remote("tokens/a/1")) == 7.0
    assert "tokens/a/1" not in ray.get(counter.get.remote())
    ray.get(counter.pop.remote("tokens/b/2"))


@pytest.mark.ray
def test_caches_are_read_by_ray_datas_v1_parquet_reader_unless_the_user_says(ray_session, monkeypatch):
    """V2 re-reads every shard's footer on new actor processes each epoch (kdscale.ray_runtime);
    a user's RAY_DATA_USE_DATASOURCE_V2 is kept."""
    import ray

    from kdscale.config import RaySpec
    from kdscale.ray_runtime import ensure_ray

    ctx = ray.data.DataContext.get_current()
    monkeypatch.setattr(ctx, "use_datasource_v2", True)
    monkeypatch.delenv("RAY_DATA_USE_DATASOURCE_V2", raising=False)
    ensure_ray(RaySpec())
    assert ctx.use_datasource_v2 is False
    ctx.use_datasource_v2 = True
    monkeypatch.setenv("RAY_DATA_USE_DATASOURCE_V2", "1")
    ensure_ray(RaySpec())
    assert ctx.use_datasource_v2 is True


def _reduce_in_a_group(rank: int, world: int, port: int, backend: str, device: str, out) -> None:
    import torch
    import torch.distributed as dist

    from kdscale.student.loop import across_ranks

    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        if device == "cuda":
            torch.cuda.set_device(rank)
        values = [1.0 + rank, 10.0 * rank]
        out.put(
            (rank, across_ranks(values, torch.device(device)), across_ranks(values, torch.device(device), mean=True))
        )
    finally:
        dist.destroy_process_group()


def _reduce_on(backend: str, device: str, world: int) -> dict:
    """Each rank's (sum, mean) of ``[1 + rank, 10 * rank]`` from a process group of ``world`` processes."""
    import multiprocessing
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_reduce_in_a_group, args=(r, world, port, backend, device, out)) for r in range(world)]
    for p in procs:
        p.start()
    results = {rank: (total, mean) for rank, total, mean in (out.get(timeout=120) for _ in procs)}
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    return results


def test_across_ranks_sums_and_averages_over_a_gloo_group():
    results = _reduce_on("gloo", "cpu", world=2)
    assert results[0] == results[1] == ([3.0, 10.0], [1.5, 5.0])


@pytest.mark.gpu
def test_across_ranks_reduces_on_the_training_device_under_nccl():
    """NCCL refuses CPU tensors: the reduction is made on the GPU the student trains on (one rank
    per GPU, as NCCL requires)."""
    import torch

    world = torch.cuda.device_count()
    results = _reduce_on("nccl", "cuda", world)
    total = [sum(1.0 + r for r in range(world)), sum(10.0 * r for r in range(world))]
    assert all(results[r] == (total, [v / world for v in total]) for r in range(world))
