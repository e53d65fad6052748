"""Shared fixtures: one Ray runtime per test session (num_cpus=2), tiny job specs in temp dirs,
an MLflow sqlite store per test, and skipping of `gpu` tests on machines without CUDA."""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
JOBS = REPO / "jobs"

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# kdscale's per-user derived files (GGUF conversions, remembered weight hashes) in a folder of this
# session's own, set before Ray starts so its workers use it too; removed at exit
_HOME = tempfile.mkdtemp(prefix="kdscale-home-")
os.environ["KDSCALE_HOME"] = _HOME
atexit.register(shutil.rmtree, _HOME, True)


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if not _has_cuda():  # DeepSpeed picks its accelerator at import: on a GPU machine it must find CUDA
    os.environ.setdefault("DS_ACCELERATOR", "cpu")


def pytest_collection_modifyitems(config, items):
    if _has_cuda():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


MOTO_SERVER = Path(sys.executable).with_name("moto_server")
SESSION_AWS_SECRET = "kdscale-test-secret-7c41d9e2"


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3 endpoint (moto_server) on loopback for the whole session.

    Its address and dummy credentials go into the environment *before* Ray starts, so Ray's
    workers (teacher actors, Ray Data readers, training workers) reach it through s3fs too."""
    import subprocess
    import time
    import urllib.request

    port = _free_port()
    proc = subprocess.Popen(
        [str(MOTO_SERVER), "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            urllib.request.urlopen(url, timeout=1)
            break
        except Exception:
            time.sleep(0.1)
    else:
        proc.kill()
        raise RuntimeError("moto_server did not start")
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": SESSION_AWS_SECRET,  # distinctive, so tests can prove it is never recorded
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL_S3": url,
        "MLFLOW_S3_ENDPOINT_URL": url,
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield url
    proc.terminate()
    proc.wait(timeout=10)
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def s3_bucket(s3_endpoint, request) -> str:
    """A fresh, empty bucket named after the test."""
    import re
    import uuid

    import s3fs

    name = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-") + "-" + uuid.uuid4().hex[:8]
    s3fs.S3FileSystem(skip_instance_cache=True).mkdir(name)
    return f"s3://{name}"


@pytest.fixture(scope="session")
def ray_session(request):
    """Start Ray once for the whole session; kdscale reuses an initialized Ray. Started after the
    S3 endpoint so every Ray worker inherits its address — where moto is installed: everywhere the
    dev extras are (CI), not on a bare GPU machine that runs only the `gpu` tests."""
    import ray

    if MOTO_SERVER.exists():
        request.getfixturevalue("s3_endpoint")

    if not ray.is_initialized():
        from kdscale.ray_runtime import worker_env

        ray.init(
            num_cpus=2,
            include_dashboard=False,
            logging_level="warning",
            log_to_driver=False,
            runtime_env={"env_vars": worker_env(local=True)},
        )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def mlflow_server(s3_endpoint, tmp_path_factory):
    """A real `mlflow server` on loopback: PostgreSQL backend store, artifacts on S3 (moto)."""
    import s3fs

    from tests.services import Postgres, start_mlflow_server

    postgres = Postgres(_free_port())
    try:
        backend = postgres.create_database("mlflow")
        s3fs.S3FileSystem(skip_instance_cache=True).mkdir("mlflow-artifacts")
        port = _free_port()
        log = tmp_path_factory.mktemp("mlflow-server") / "server.log"
        proc = start_mlflow_server(backend, "s3://mlflow-artifacts", port, str(log))
    except BaseException:
        postgres.stop()
        raise
    yield f"http://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(timeout=30)
    postgres.stop()


_EMPTY_STORE: list[Path] = []  # one migrated, empty MLflow sqlite store per session


def sqlite_store(folder: Path, name: str = "mlflow.db") -> str:
    """The URI of a new, empty MLflow sqlite store at ``folder / name``: a copy of one store
    migrated once per session. MLflow builds a new store's ~50 tables by running every schema
    migration, 1.7 s on this machine; some fifty tests each made their own."""
    if not _EMPTY_STORE:
        from mlflow import MlflowClient

        template = Path(tempfile.mkdtemp(prefix="kdscale-test-mlflow-")) / "empty.db"
        atexit.register(shutil.rmtree, template.parent, True)
        MlflowClient(f"sqlite:///{template}").search_experiments()  # creates and migrates it
        _EMPTY_STORE.append(template)
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(_EMPTY_STORE[0], folder / name)
    return f"sqlite:///{folder / name}"


@pytest.fixture
def mlflow_uri(tmp_path, monkeypatch) -> str:
    uri = sqlite_store(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


def write_job(tmp_path: Path, base: str = "tiny.yaml", dest: str | None = None, **overrides) -> Path:
    """Copy a job from jobs/ into tmp_path (assets included, so relative paths resolve) with
    top-level/nested overrides given as dotted keys, e.g. ``**{"cache.rows_per_shard": 8}``."""
    assets = tmp_path / "assets"
    if not assets.exists():
        shutil.copytree(JOBS / "assets", assets)
    spec = yaml.safe_load((JOBS / base).read_text())
    for dotted, value in overrides.items():
        node = spec
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node.setdefault(key, {})
        if isinstance(node, list):
            node[int(leaf)] = value
        else:
            node[leaf] = value
    path = tmp_path / (dest or base)
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


@pytest.fixture
def tiny_job(tmp_path) -> Path:
    return write_job(tmp_path)


@pytest.fixture(scope="module")
def committed(ray_session, tmp_path_factory):
    """(job spec, workdir) of the tiny job after its precompute: a committed cache to damage in copies."""
    from typer.testing import CliRunner

    from kdscale.cli import app

    tmp = tmp_path_factory.mktemp("committed")
    job = write_job(tmp)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", sqlite_store(tmp))
        result = CliRunner().invoke(app, ["precompute", str(job), "--workdir", str(tmp / "w")])
    assert result.exit_code == 0, result.output
    return job, tmp / "w"


# A student small enough to train in seconds (the tiny job's own student is 2 layers of d=32).
TINY_STUDENT_ARCH = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
}

# SmolLM2-135M's shape (the real teacher), for planning tests that build no weights.
SMOLLM2_SHAPE = {
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "vocab_size": 49152,
}


def llama_config(**fields):
    """A Llama config: a tiny one (d=64, 4 layers, 4 heads, 2 kv heads, vocab 300) unless overridden."""
    from transformers import AutoConfig

    shape = {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 300,
    }
    return AutoConfig.for_model("llama", **{**shape, **fields})


def cli_in_subprocess(ray_session, cwd: Path, *args: str, stderr=subprocess.DEVNULL) -> subprocess.Popen:
    """``kdscale ARGS`` as its own process attached to the session's Ray (a driver a test can kill)."""
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    return subprocess.Popen(
        [sys.executable, "-m", "kdscale.cli", *args], env=env, stdout=subprocess.DEVNULL, stderr=stderr, cwd=cwd
    )
