"""The same tiny job with every output on s3:// (a real moto_server on loopback): cache shards
written by teacher actors, Ray Data reading them, Ray Train checkpoints, the export, and the CLI's
cache tools on the URI."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from kdscale import fs
from kdscale.cache.reader import open_manifest
from kdscale.cache.verify import problems
from kdscale.cli import app
from tests.conftest import write_job

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def test_tiny_job_end_to_end_on_s3(ray_session, s3_bucket, tmp_path, mlflow_uri):
    job = write_job(tmp_path, **{"students.0.train.epochs": 1})
    workdir = f"{s3_bucket}/runs/tiny"
    result = CliRunner().invoke(app, ["run", str(job), "--workdir", workdir])
    assert result.exit_code == 0, result.output

    summary = fs.read_json(f"{workdir}/summary.json")
    cache = summary["cache"]["uri"]
    assert cache == f"{workdir}/cache"
    m = open_manifest(cache)
    assert m.cache_id == summary["cache"]["cache_id"]
    assert problems(cache)[1] == []

    inspect = CliRunner().invoke(app, ["cache", "inspect", cache, "--json"])
    assert inspect.exit_code == 0, inspect.output
    assert json.loads(inspect.output)["cache_id"] == m.cache_id
    assert CliRunner().invoke(app, ["cache", "verify", cache]).exit_code == 0

    student = summary["students"]["tiny-student"]
    assert student["export"] == f"{workdir}/students/tiny-student/export"
    assert fs.exists(f"{student['export']}/model.safetensors")
    runs = fs.listdir(f"{workdir}/students/tiny-student/checkpoints")
    (run,) = [r for r in runs if r.startswith("ray-")]  # Ray Train's run folder, on S3
    assert any(c.startswith("checkpoint_") for c in fs.listdir(f"{workdir}/students/tiny-student/checkpoints/{run}"))
    assert student["heldout_ce"] < student["heldout_ce_untrained"]

    from kdscale.student.evaluate import load_exported

    model = load_exported(student["export"])
    assert model.config.vocab_size == m.tokenizer.vocab_size
