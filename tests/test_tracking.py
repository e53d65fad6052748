"""Tracking without Ray: credential redaction, an unreachable server refused before any work,
and model registration that leaves either a complete version or none."""

from __future__ import annotations

import time

import pytest
from typer.testing import CliRunner

from kdscale.cli import app
from kdscale.tracking.redact import MASK, redact, redact_text, secret_values
from tests.conftest import _free_port, sqlite_store, write_job  # a port nothing listens on


def test_secret_values_come_from_credential_like_variables():
    env = {
        "AWS_SECRET_ACCESS_KEY": "abcdefgh1234",
        "MLFLOW_TRACKING_TOKEN": "tok-123456789",
        "HOME": "/root",
        "DB_PASSWORD": "short",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    assert set(secret_values(env)) == {"abcdefgh1234", "tok-123456789"}  # "short" is too short to mask safely


def test_redact_masks_env_secrets_and_uri_passwords_anywhere():
    secrets = ["abcdefgh1234"]
    spec = {
        "tracking": {"uri": "https://alice:hunter2@mlflow.example.com"},
        "backend": "postgresql://mlflow:pa55word@db:5432/mlflow",
        "paths": ["s3://bucket/key?token=abcdefgh1234"],
        "n": 3,
        "note": None,
    }
    out = redact(spec, secrets)
    assert out["tracking"]["uri"] == f"https://alice:{MASK}@mlflow.example.com"
    assert out["backend"] == f"postgresql://mlflow:{MASK}@db:5432/mlflow"
    assert out["paths"] == [f"s3://bucket/key?token={MASK}"]
    assert out["n"] == 3 and out["note"] is None
    assert redact_text("s3://bucket/plain/path", secrets) == "s3://bucket/plain/path"


def test_unreachable_tracking_server_fails_fast_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://kdscale:hunter2pw@127.0.0.1:{_free_port()}")
    job = write_job(tmp_path)
    workdir = tmp_path / "work"
    started = time.perf_counter()
    result = CliRunner().invoke(app, ["run", str(job), "--workdir", str(workdir)])
    assert result.exit_code == 2, result.output
    assert "unreachable" in result.output and "Nothing was run" in result.output
    assert "hunter2pw" not in result.output  # the URI is shown with its password masked
    assert time.perf_counter() - started < 60
    assert not workdir.exists()
    lineage = CliRunner().invoke(app, ["lineage", "some-model"])
    assert lineage.exit_code == 2 and "unreachable" in lineage.output


def _export(tmp_path):
    folder = tmp_path / "export"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    return str(folder)


def test_registration_leaves_no_half_registered_version(tmp_path):
    from mlflow import MlflowClient

    from kdscale.tracking.registry import register_export

    client = MlflowClient(sqlite_store(tmp_path))
    run_id = client.create_run(client.create_experiment("x", (tmp_path / "artifacts").as_uri())).info.run_id
    original = client.log_artifacts

    def broken_upload(*args, **kwargs):
        raise OSError("artifact store went away")

    client.log_artifacts = broken_upload
    with pytest.raises(OSError):
        register_export(client, run_id, _export(tmp_path), "m", {"kdscale.cache_id": "c" * 32})
    assert client.search_model_versions("name = 'm'") == []

    client.log_artifacts = original
    version = register_export(client, run_id, _export(tmp_path / "again"), "m", {"kdscale.cache_id": "c" * 32})
    (mv,) = client.search_model_versions("name = 'm'")
    assert (mv.version, mv.run_id, mv.tags["kdscale.cache_id"]) == (int(version.version), run_id, "c" * 32)
    assert version.source.endswith("/model")
    assert [f.path for f in client.list_artifacts(run_id, "model")] == ["model/config.json"]


def test_lineage_needs_exactly_one_target(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", sqlite_store(tmp_path))
    assert CliRunner().invoke(app, ["lineage"]).exit_code == 2
    missing = CliRunner().invoke(app, ["lineage", "no-such-model"])
    assert missing.exit_code == 1 and "no registered model named 'no-such-model'" in missing.output
