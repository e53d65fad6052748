"""Shared fixtures: one Ray runtime per test session (num_cpus=2), tiny job specs in temp dirs,
an MLflow sqlite store per test, and skipping of `gpu` tests on machines without CUDA."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
JOBS = REPO / "jobs"

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DS_ACCELERATOR", "cpu")


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def ray_session():
    """Start Ray once for the whole session; kdscale reuses an initialized Ray."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, logging_level="warning", log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture
def mlflow_uri(tmp_path, monkeypatch) -> str:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


def write_job(tmp_path: Path, base: str = "tiny.yaml", **overrides) -> Path:
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
    path = tmp_path / base
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


@pytest.fixture
def tiny_job(tmp_path) -> Path:
    return write_job(tmp_path)
