"""Lineage against a real tracking server: `mlflow server` on loopback with a PostgreSQL backend
store and an S3 (moto) artifact store. Two jobs share one cache — the second names the first's
cache and does no teacher work — and `kdscale lineage` walks both ways through what the server
recorded. Credentials in the environment must appear in nothing recorded."""

from __future__ import annotations

import json
import os

import pytest
from typer.testing import CliRunner

from kdscale import fs
from kdscale.cache.reader import open_manifest
from kdscale.cli import app
from tests.conftest import SESSION_AWS_SECRET, TINY_STUDENT_ARCH, write_job

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.services]

TRACKING_TOKEN = "kdscale-tracking-token-5b0e66f1"
STUDENT_A, STUDENT_B = "tiny-student", "small-student"


@pytest.fixture(scope="module")
def two_jobs(ray_session, mlflow_server, tmp_path_factory):
    """Job A computes a cache and trains a student; job B names A's cache and trains another."""
    tmp = tmp_path_factory.mktemp("lineage")
    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_TOKEN")}
    os.environ["MLFLOW_TRACKING_URI"] = mlflow_server
    os.environ["MLFLOW_TRACKING_TOKEN"] = TRACKING_TOKEN  # sent, ignored by this server: must never be recorded
    try:
        job_a = write_job(tmp / "a", name="lineage-a", **{"students.0.train.epochs": 1})
        run_a = CliRunner().invoke(app, ["run", str(job_a), "--workdir", str(tmp / "a" / "work")])
        assert run_a.exit_code == 0, run_a.output
        cache = str(tmp / "a" / "work" / "cache")
        student_b = {
            "name": STUDENT_B,
            "architecture": TINY_STUDENT_ARCH,
            "train": {"num_workers": 2, "cpus_per_worker": 0.5, "epochs": 1, "micro_batch_size": 4},
        }
        job_b = write_job(tmp / "b", name="lineage-b", students=[student_b], **{"cache.uri": cache})
        run_b = CliRunner().invoke(app, ["run", str(job_b), "--workdir", str(tmp / "b" / "work")])
        assert run_b.exit_code == 0, run_b.output
        yield {
            "uri": mlflow_server,
            "cache": cache,
            "output": run_a.output + run_b.output,
            "a": json.loads((tmp / "a" / "work" / "summary.json").read_text()),
            "b": json.loads((tmp / "b" / "work" / "summary.json").read_text()),
        }
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _lineage(uri: str, *args: str) -> dict:
    result = CliRunner().invoke(app, ["lineage", *args, "--json", "--tracking-uri", uri])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_second_job_reuses_the_cache(two_jobs):
    a, b = two_jobs["a"], two_jobs["b"]
    assert a["cache"]["reused"] is False
    assert b["cache"]["reused"] is True and b["cache"]["cache_id"] == a["cache"]["cache_id"]
    assert b["students"][STUDENT_B]["cache_id"] == a["cache"]["cache_id"]


def test_model_lineage_walks_back_to_teacher_and_corpus(two_jobs):
    a = two_jobs["a"]
    m = open_manifest(two_jobs["cache"])
    registered = a["students"][STUDENT_A]["registered_model"]
    assert registered == {"name": f"lineage-a-{STUDENT_A}", "version": "1"}
    info = _lineage(two_jobs["uri"], f"{registered['name']}/1")
    assert info["model"]["run_id"] == a["students"][STUDENT_A]["mlflow_run_id"]
    tags = info["model"]["tags"]
    assert tags["kdscale.cache_id"] == m.cache_id
    assert tags["kdscale.teacher_fingerprint"] == m.teacher.fingerprint
    assert tags["kdscale.tokenizer_fingerprint"] == m.tokenizer.fingerprint
    assert tags["kdscale.dataset_content_hash"] == m.dataset.content_hash
    assert info["student_run"]["experiment"] == "lineage-a" and info["student_run"]["status"] == "FINISHED"
    assert info["cache"]["uri"] == two_jobs["cache"] and info["cache"]["cache_id"] == m.cache_id
    assert info["cache"]["manifest"]["tokens"] == m.totals["tokens"]
    # the run that *wrote* the cache (job A's), not job B's run that found it already there
    assert info["precompute_run"]["run_id"] == a["mlflow"]["precompute_run_id"]
    assert info["teacher"] == {
        "name": m.teacher.name,
        "fingerprint": m.teacher.fingerprint,
        "dtype": m.teacher.dtype,
        "source": m.teacher.source,
    }
    assert info["corpus"]["content_hash"] == m.dataset.content_hash and info["corpus"]["sources"]
    assert info["checks"] == []
    latest = _lineage(two_jobs["uri"], registered["name"])
    assert latest["model"]["version"] == "1"


def test_cache_lineage_lists_students_of_both_jobs(two_jobs):
    info = _lineage(two_jobs["uri"], "--cache", two_jobs["cache"])
    by_student = {s["student"]: s for s in info["students"]}
    assert set(by_student) == {STUDENT_A, STUDENT_B}
    assert {s["job"] for s in info["students"]} == {"lineage-a", "lineage-b"}
    assert by_student[STUDENT_B]["registered"] == [{"name": f"lineage-b-{STUDENT_B}", "version": "1"}]
    assert all("heldout/heldout_ce" in s["metrics"] for s in info["students"])
    by_id = _lineage(two_jobs["uri"], "--cache", two_jobs["a"]["cache"]["cache_id"])
    assert {s["run_id"] for s in by_id["students"]} == {s["run_id"] for s in info["students"]}


def test_registered_model_loads_from_the_s3_artifact_store(two_jobs, tmp_path):
    import mlflow
    from transformers import AutoModelForCausalLM

    mlflow.set_tracking_uri(two_jobs["uri"])
    name = two_jobs["a"]["students"][STUDENT_A]["registered_model"]["name"]
    folder = mlflow.artifacts.download_artifacts(f"models:/{name}/1", dst_path=str(tmp_path))
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert model.config.vocab_size == 512
    # the artifacts went through the server into the moto bucket, not to a local folder
    assert fs.listdir("s3://mlflow-artifacts")


def test_plots_and_manifest_are_run_artifacts(two_jobs):
    from mlflow import MlflowClient

    client = MlflowClient(two_jobs["uri"])
    a = two_jobs["a"]

    def files(run_id: str, path: str) -> set[str]:
        return {os.path.basename(f.path) for f in client.list_artifacts(run_id, path)}

    student = a["students"][STUDENT_A]["mlflow_run_id"]
    assert files(student, "plots") == {"loss_curves.png", "eval.png"}
    assert "model.safetensors" in files(student, "model")
    precompute = a["mlflow"]["precompute_run_id"]
    assert files(precompute, "plots") == {"cache_profile.png"}
    assert files(precompute, "cache") == {"manifest.json"}
    png = client.download_artifacts(student, "plots/loss_curves.png")
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_no_credential_is_recorded(two_jobs, tmp_path):
    """Params, tags, metrics' names, every text artifact of every run, the summaries and the
    console output: none may hold the AWS secret or the tracking token."""
    from mlflow import MlflowClient

    client = MlflowClient(two_jobs["uri"])
    secrets = (SESSION_AWS_SECRET, TRACKING_TOKEN)
    seen = [two_jobs["output"], json.dumps(two_jobs["a"]), json.dumps(two_jobs["b"])]
    for exp in client.search_experiments():
        for run in client.search_runs([exp.experiment_id]):
            seen += [json.dumps(run.data.params), json.dumps(run.data.tags), json.dumps(list(run.data.metrics))]
            seen += [d.dataset.source + (d.dataset.profile or "") for d in run.inputs.dataset_inputs]
            local = client.download_artifacts(run.info.run_id, "", str(tmp_path / run.info.run_id))
            for root, _, names in os.walk(local):
                for name in names:
                    if name.endswith((".json", ".yaml", ".txt")):
                        with open(os.path.join(root, name), errors="replace") as f:
                            seen.append(f.read())
    for mv in client.search_model_versions():
        seen += [json.dumps(mv.tags), mv.source, mv.description or ""]
    assert len(seen) > 10
    for text in seen:
        for secret in secrets:
            assert secret not in text
