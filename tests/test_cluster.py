"""`kdscale submit` for real: a two-node Ray cluster on loopback (`ray start --head` plus a second
`ray start --address` node with its own temp dir and a custom resource), MLflow on a local server,
the job's workdir on S3 (moto) only; and submissions refused before anything reaches a cluster."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
from typer.testing import CliRunner

from kdscale.cli import app
from tests.conftest import SESSION_AWS_SECRET, _free_port, write_job

RAY = str(Path(sys.executable).with_name("ray"))


def _ray(*args: str, env: dict) -> None:
    subprocess.run([RAY, *args], check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=180)


@dataclass
class Cluster:
    address: str  # the head's dashboard URL (what `kdscale submit --address` takes)
    env: dict
    start_second: Callable[[], None]  # (re)start the second node
    second_dir: Path  # the second node's temp dir (its processes name it)


@pytest.fixture(scope="module")
def cluster(s3_endpoint, tmp_path_factory):
    """A head node (1 CPU) and a second node (1 CPU, resource `second_node`), each with its own
    temp dir; both torn down after the module."""
    tmp = Path("/tmp") / f"kd-cluster-{os.getpid()}"  # Ray's socket paths must stay short
    port, dashboard = _free_port(), _free_port()
    # token auth off explicitly: with a token file in ~/.ray a head may demand one the second node lacks
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
    env["PATH"] = f"{Path(sys.executable).parent}:{os.environ['PATH']}"
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH")) if p
    )

    def own_ports() -> list[str]:  # two nodes on one machine: each agent needs ports of its own
        names = ("dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port",
                 "runtime-env-agent-port", "ray-client-server-port")  # fmt: skip
        return [f"--{name}={_free_port()}" for name in names]

    head = ["start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1", "--num-cpus=1",
            "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
            f"--temp-dir={tmp}/head", "--disable-usage-stats", *own_ports()]  # fmt: skip

    def start_second() -> None:
        _ray("start", f"--address=127.0.0.1:{port}", "--node-ip-address=127.0.0.1", "--num-cpus=1",
             '--resources={"second_node": 1}', f"--temp-dir={tmp}/node2", "--disable-usage-stats",
             *own_ports(), env=env)  # fmt: skip

    try:
        _ray(*head, env=env)
        start_second()
        url = f"http://127.0.0.1:{dashboard}"
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"{url}/api/cluster_status", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(1)
        yield Cluster(url, env, start_second, tmp / "node2")
    finally:  # this cluster's processes only (`ray stop` would stop every Ray on the machine)
        for signal in ("terminate", "kill"):
            for proc in _cluster_processes(tmp, port):
                try:
                    getattr(proc, signal)()
                except psutil.NoSuchProcess:
                    pass
            time.sleep(3)
        left = [p.pid for p in _cluster_processes(tmp, port) if _running(p)]
        assert not left, f"processes of the cluster outlived it: {left}"


def _cluster_processes(tmp: Path, gcs_port: int) -> list[psutil.Process]:
    """Every process of the cluster: those whose command line names its temp dir (raylets, GCS,
    dashboards) or its GCS port (the head's Ray client server) or that write logs under the temp
    dir, and their descendants. The dashboard and runtime-env agents, titled
    ``ray::DashboardAgent``, show neither on their command line: they were found alive, at 10% of
    a core, after the module had ended (2026-12-07), the second node's orphaned by its killed raylet."""
    roots = [proc for proc in psutil.process_iter(["cmdline"]) if _belongs(proc, str(tmp), f":{gcs_port}")]
    found = {p.pid: p for p in roots}
    for proc in roots:
        try:
            found.update({c.pid: c for c in proc.children(recursive=True)})
        except psutil.NoSuchProcess:
            continue
    found.pop(os.getpid(), None)
    return list(found.values())


def _running(proc: psutil.Process) -> bool:
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _belongs(proc: psutil.Process, tmp: str, gcs_port: str) -> bool:
    args = proc.info["cmdline"] or []
    if any(tmp in a for a in args) or any(a.startswith("--address=") and a.endswith(gcs_port) for a in args):
        return True
    try:
        return any(f.path.startswith(tmp) for f in proc.open_files())
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def _submit(*args: str):
    return CliRunner().invoke(app, ["submit", *args])


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.services
def test_tiny_job_submitted_to_a_two_node_cluster_runs_from_object_storage(
    cluster, mlflow_server, s3_bucket, tmp_path, monkeypatch
):
    """--follow streams the logs and exits 0; the workdir (cache, checkpoints, export) is on S3;
    the two teacher actors (a node's CPU each) ran on both nodes, as the manifest's shards record,
    and the summary names each training worker's node; a second job reuses the cache from S3; the S3
    credentials the job was given show in no log line."""
    import s3fs

    address = cluster.address
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    # a teacher replica needs a whole node's CPU (so one runs on each); training workers leave a
    # CPU free for Ray Data's read tasks
    sizes = {"students.0.train.epochs": 1, "teacher.num_cpus": 1, "students.0.train.cpus_per_worker": 0.25}
    job = write_job(tmp_path, **sizes, **{"cache.uri": f"{s3_bucket}/cache"})
    result = _submit(str(job), "--address", address, "--workdir", f"{s3_bucket}/w", "--follow")
    assert result.exit_code == 0, result.output[-3000:]
    assert "SUCCEEDED" in result.output and SESSION_AWS_SECRET not in result.output
    store = s3fs.S3FileSystem(skip_instance_cache=True)
    summary = json.loads(store.cat(f"{s3_bucket}/w/summary.json"))
    assert summary["cache"]["uri"] == f"{s3_bucket}/cache" and summary["students"]["tiny-student"]["heldout_ce"] > 0
    manifest = json.loads(store.cat(f"{s3_bucket}/cache/manifest.json"))
    assert len({s["node"] for s in manifest["shards"]}) == 2  # both teacher replicas wrote shards
    assert len(summary["students"]["tiny-student"]["nodes"]) == 2  # one per worker
    job_id = result.output.split("Submitted", 1)[1].split()[0]
    status = CliRunner().invoke(app, ["jobs", "status", job_id, "--address", address])
    assert status.exit_code == 0 and json.loads(status.output)["status"] == "SUCCEEDED"
    logs = CliRunner().invoke(app, ["jobs", "logs", job_id, "--address", address])
    assert "Cache" in logs.output and SESSION_AWS_SECRET not in logs.output
    # (its precompute stage alone: finding the committed cache on S3 is what a reuse is; training
    # from S3 is the first job's)
    again = _submit(str(job), "--address", address, "--workdir", f"{s3_bucket}/w2", "--stage", "precompute", "--follow")
    assert again.exit_code == 0, again.output[-3000:]
    second = json.loads(store.cat(f"{s3_bucket}/w2/summary.json"))
    assert second["cache"]["reused"] and second["cache"]["cache_id"] == manifest["cache_id"]
    _listed_and_followed(address, job_id, again.output.split("Submitted", 1)[1].split()[0], s3_bucket)


def _listed_and_followed(address: str, first: str, second: str, bucket: str) -> None:
    """`kdscale jobs list` shows both submissions, newest first, with the stage and workdir each
    ran; `jobs logs --follow` on an ended job prints its logs and exits with its status."""
    listed = CliRunner().invoke(app, ["jobs", "list", "--address", address, "--json"])
    assert listed.exit_code == 0, listed.output
    ids = [r["job_id"] for r in json.loads(listed.output)]
    rows = {r["job_id"]: r for r in json.loads(listed.output)}
    assert ids.index(second) < ids.index(first)
    assert {k: rows[first][k] for k in ("job", "stage", "workdir", "status")} == {
        "job": "tiny",
        "stage": "run",
        "workdir": f"{bucket}/w",
        "status": "SUCCEEDED",
    }
    assert rows[second]["stage"] == "precompute" and rows[second]["workdir"] == f"{bucket}/w2"
    assert rows[first]["started"] <= rows[first]["ended"] <= rows[second]["started"]
    table = CliRunner().invoke(app, ["jobs", "list", "--address", address])
    assert table.exit_code == 0 and first in table.output and second in table.output, table.output
    followed = CliRunner().invoke(app, ["jobs", "logs", first, "--address", address, "--follow"])
    assert followed.exit_code == 0 and "Cache" in followed.output, followed.output[-2000:]
    assert f"job {first}: SUCCEEDED" in followed.output and SESSION_AWS_SECRET not in followed.output


def _ledger_shards(store, cache: str) -> list[str]:
    """Finished-shard entries in a cache's ledger on S3 (not the claim, lease or unit entries)."""
    try:
        names = [p.rsplit("/", 1)[-1] for p in store.ls(f"{cache}/_ledger", refresh=True)]
    except FileNotFoundError:
        return []
    return [n for n in names if n.endswith(".json") and n not in ("plan.json", "lease.json")]


def _kill_raylet(node_dir: Path) -> int:
    """SIGKILL the raylet of the node whose temp dir is ``node_dir``; how many were killed."""
    killed = 0
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if "raylet" in cmdline.split(" ", 1)[0] and str(node_dir) in cmdline:
            proc.kill()
            killed += 1
    return killed


def _final_state(address: str, job_id: str, timeout: float = 420) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        status = CliRunner().invoke(app, ["jobs", "status", job_id, "--address", address])
        state = json.loads(status.output)["status"] if status.exit_code == 0 else None
        if state in ("SUCCEEDED", "FAILED", "STOPPED"):
            return state
        time.sleep(2)
    raise AssertionError(f"job {job_id} did not end within {timeout} s after its node was lost")


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.services
def test_a_lost_node_during_precompute_fails_cleanly_and_a_rerun_resumes_the_cache(
    cluster, mlflow_server, s3_bucket, tmp_path, monkeypatch
):
    """The second node's raylet is killed while its teacher replica writes shards: the job ends
    (teacher actors are not restarted, so it fails, naming the lost actor — or it had already
    finished its work); with the node back, a rerun resumes the unfinished cache from its ledger
    and commits it under the cache_id the first run claimed, keeping the shards that had landed.
    Both jobs run the precompute stage alone, submitted from the Python API."""
    import s3fs

    import kdscale

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    cache = f"{s3_bucket}/cache-lost-node"
    sizes = {
        "students.0.train.epochs": 1,
        "teacher.num_cpus": 1,  # one replica per node
        "teacher.batch_size": 1,
        "cache.rows_per_shard": 1,  # one S3 object per row: a precompute long enough to interrupt
        "students.0.train.cpus_per_worker": 0.25,
        "cache.uri": cache,
    }
    job = write_job(tmp_path, **sizes)
    job_id = kdscale.submit_job(job, f"{s3_bucket}/lost", address=cluster.address, stage="precompute")
    store = s3fs.S3FileSystem(skip_instance_cache=True)
    deadline = time.time() + 300
    while not _ledger_shards(store, cache) and time.time() < deadline:
        time.sleep(0.1)
    assert _ledger_shards(store, cache), "no shard landed"
    assert _kill_raylet(cluster.second_dir) == 1
    landed = set(_ledger_shards(store, cache))
    state = _final_state(cluster.address, job_id)
    assert kdscale.job_status(job_id, cluster.address)["entrypoint"].startswith("kdscale precompute job.yaml")
    logs = kdscale.job_logs(job_id, cluster.address)
    if state != "SUCCEEDED":
        assert state == "FAILED" and not store.exists(f"{cache}/manifest.json")  # nothing half-committed
        assert "Actor" in logs or "actor" in logs, logs[-2000:]

    cluster.start_second()
    claimed = json.loads(store.cat(f"{cache}/_ledger/plan.json"))["cache_id"]
    again = kdscale.submit_job(job, f"{s3_bucket}/lost2", address=cluster.address, stage="precompute")
    lines: list[str] = []
    assert kdscale.follow_job(again, cluster.address, lines.append) == "SUCCEEDED", "".join(lines)[-3000:]
    store.invalidate_cache()  # s3fs keeps the listing it saw while the manifest did not exist yet
    manifest = json.loads(store.cat(f"{cache}/manifest.json"))
    assert manifest["cache_id"] == claimed
    if state != "SUCCEEDED":
        assert "Resuming cache" in " ".join("".join(lines).split())
    assert not store.exists(f"{s3_bucket}/lost2/students")  # the precompute stage alone
    recorded = {s["path"] for s in manifest["shards"]}
    assert {n.replace(".json", ".parquet") for n in landed} <= recorded
    verify = CliRunner().invoke(app, ["cache", "verify", cache])
    assert verify.exit_code == 0, verify.output


def test_submissions_that_cannot_work_are_refused_before_contacting_a_cluster(tmp_path, monkeypatch):
    """Absolute local corpus and a sqlite tracking store (one message, both fields), a local
    workdir, inputs over the size limit, a relative path leaving the job's folder, and an
    unreachable address: exit 2, each named."""
    from kdscale import submit as jobs

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'm.db'}")  # refused: never opened
    job = write_job(tmp_path, **{"corpus.paths": [str(tmp_path / "assets" / "tiny-corpus" / "*.rst")]})
    result = _submit(str(job), "--address", "http://127.0.0.1:9", "--workdir", str(tmp_path / "w"))
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    for field in ("corpus.paths.0", "tracking.uri", "--workdir"):
        assert field in text, field
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    monkeypatch.setattr(jobs, "MAX_PACKAGE_BYTES", 1000)
    big = _submit(str(write_job(tmp_path)), "--address", "http://127.0.0.1:9", "--workdir", "s3://b/w")
    assert big.exit_code == 2 and "object storage" in big.output, big.output
    monkeypatch.setattr(jobs, "MAX_PACKAGE_BYTES", 100 * 2**20)
    outside = write_job(tmp_path, **{"teacher.tokenizer": "../elsewhere"})
    (tmp_path.parent / "elsewhere").mkdir(exist_ok=True)
    left = _submit(str(outside), "--address", "http://127.0.0.1:9", "--workdir", "s3://b/w")
    assert left.exit_code == 2 and "leaves the job's folder" in " ".join(left.output.split()), left.output
    unreachable = _submit(str(write_job(tmp_path)), "--address", "http://127.0.0.1:9", "--workdir", "s3://b/w")
    assert unreachable.exit_code == 2 and "cannot reach the Ray cluster" in unreachable.output, unreachable.output
    listing = CliRunner().invoke(app, ["jobs", "list", "--address", "http://127.0.0.1:9"])
    assert listing.exit_code == 2 and "cannot reach the Ray cluster" in listing.output, listing.output
    stage = _submit(str(write_job(tmp_path)), "--address", "http://127.0.0.1:9", "--workdir", "s3://b/w", "--stage=x")
    assert stage.exit_code == 2 and "stage 'x' is not one of run, precompute, train, eval" in stage.output, stage.output
