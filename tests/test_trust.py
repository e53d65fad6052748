"""The trust gaps of issue 13, each reproduced as it was found and now refused: a cache is verified
on every path that reads it, the manifest is checked against its own fields and its shards,
impossible jobs fail before work, non-finite training publishes nothing, and no credential or
path escape gets through."""

from __future__ import annotations

import json
import shutil

import pytest
from typer.testing import CliRunner

from kdscale.cache.format import MANIFEST
from kdscale.cache.reader import open_manifest
from kdscale.cache.verify import problems
from kdscale.cli import app
from kdscale.fingerprint import cache_id as make_cache_id
from kdscale.processes import host
from tests.conftest import TINY_STUDENT_ARCH, sqlite_store, write_job

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def _copy_cache(committed, dest):
    shutil.copytree(committed[1] / "cache", dest)
    return dest


def _edit_manifest(cache, edit, fix_cache_id: bool = False) -> None:
    raw = json.loads((cache / MANIFEST).read_text())
    edit(raw)
    if fix_cache_id:  # an editor who also recomputes the cache_id to match
        m = raw
        params = {k: v for k, v in m["targets"].items() if not (k == "draws" and v == 1)}
        raw["cache_id"] = make_cache_id(
            m["teacher"]["fingerprint"],
            m["tokenizer"]["fingerprint"],
            m["dataset"].get("identity") or m["dataset"]["content_hash"],
            params,
            m["format_version"],
        )
    (cache / MANIFEST).write_text(json.dumps(raw))


def _flat(text: str) -> str:
    return " ".join(text.split())


def _registered(mlflow_uri: str) -> list:
    from mlflow import MlflowClient

    return MlflowClient(mlflow_uri).search_registered_models()


# 1. `kdscale run` verifies a reused cache like `train` does ------------------------------------


def test_run_refuses_a_reused_cache_with_swapped_shards(committed, tmp_path, mlflow_uri):
    cache = _copy_cache(committed, tmp_path / "copy")
    a, b = cache / "train-00000.parquet", cache / "train-00001.parquet"
    tmp = tmp_path / "swap"
    a.rename(tmp), b.rename(a), tmp.rename(b)
    job = write_job(tmp_path, **{"cache.uri": str(cache)})
    result = CliRunner().invoke(app, ["run", str(job), "--workdir", str(tmp_path / "w")])
    assert result.exit_code == 1, result.output
    out = _flat(result.output)
    assert "refusing the cache" in out and "train-00000.parquet" in out and "reusing it" not in out
    assert not (tmp_path / "w" / "students").exists() and _registered(mlflow_uri) == []


# 2. the manifest is checked against its own fields and its shards ------------------------------


@pytest.mark.parametrize(
    "name, edit, fix_id, expect",
    [
        ("zero cache_id", lambda m: m.update(cache_id="0" * 32), False, "cache_id"),
        ("num_samples 50 -> 1", lambda m: m["targets"].update(num_samples=1), False, "cache_id"),
        (
            "num_samples 50 -> 1, cache_id recomputed",
            lambda m: m["targets"].update(num_samples=1),
            True,
            "draw counts per position sum to [50]",
        ),
        (
            "shard path outside the cache",
            lambda m: m["shards"][0].update(path="../outside.parquet"),
            False,
            "not the plain name",
        ),
        ("kind edited", lambda m: m["targets"].update(kind="topk", k=12, num_samples=None), True, "columns"),
        ("seq_len edited", lambda m: m["dataset"].update(seq_len=32), False, "tokens for"),
        ("rows.train 10^12", lambda m: m["dataset"]["rows"].update(train=10**12), False, "dataset.rows"),
        ("totals edited", lambda m: m["totals"].update(tokens=1), False, "totals.tokens"),
        ("no shards", lambda m: m.update(shards=[]), False, "no shards"),
    ],
)
def test_edited_manifest_is_refused(committed, tmp_path, name, edit, fix_id, expect):
    cache = _copy_cache(committed, tmp_path / "copy")
    _edit_manifest(cache, edit, fix_id)
    result = CliRunner().invoke(app, ["cache", "verify", str(cache)])
    assert result.exit_code == 1 and expect in _flat(result.output), (name, result.output)


def test_shard_path_to_a_real_file_with_its_real_sha256_is_refused(committed, tmp_path):
    import hashlib

    cache = _copy_cache(committed, tmp_path / "copy")
    outside = tmp_path / "hostname"
    outside.write_bytes(b"somehost\n")
    digest = hashlib.sha256(outside.read_bytes()).hexdigest()
    _edit_manifest(cache, lambda m: m["shards"][0].update(path=str(outside), sha256=digest, bytes=9))
    found = problems(str(cache))[1]
    assert any("not the plain name" in p for p in found)


def test_training_from_an_edited_manifest_registers_nothing(committed, tmp_path, mlflow_uri):
    work = tmp_path / "w"
    cache = _copy_cache(committed, work / "cache")
    _edit_manifest(cache, lambda m: m["dataset"]["rows"].update(train=10**12))
    job = write_job(tmp_path)
    result = CliRunner().invoke(app, ["train", str(job), "--workdir", str(work)])
    assert result.exit_code == 1 and "dataset.rows" in _flat(result.output)
    assert not (work / "students").exists() and _registered(mlflow_uri) == []


# 4. impossible teacher resources fail before any work ------------------------------------------


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"teacher.num_cpus": 64}, "teacher.num_cpus"),
        ({"teacher.num_gpus": 1}, "teacher.num_gpus"),
        ({"teacher.replicas": 4, "teacher.shards": 2, "teacher.num_cpus": 1}, "teacher.num_cpus"),
    ],
)
def test_impossible_teacher_resources_are_refused_before_work(ray_session, tmp_path, mlflow_uri, overrides, field):
    job = write_job(tmp_path, **overrides)
    for args in (["run", str(job), "--dry-run"], ["run", str(job), "--workdir", str(tmp_path / "w")]):
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 2 and field in result.output, result.output
    assert not (tmp_path / "w").exists()
    from mlflow import MlflowClient

    assert MlflowClient(mlflow_uri).search_experiments(filter_string="name = 'tiny'") == []


def test_teacher_actors_that_never_start_fail_naming_resources(ray_session, tmp_path, mlflow_uri):
    from mlflow import MlflowClient

    job = write_job(tmp_path, **{"teacher.start_timeout_s": 0.01})
    result = CliRunner().invoke(app, ["precompute", str(job), "--workdir", str(tmp_path / "w")])
    assert result.exit_code == 1 and "teacher.start_timeout_s" in _flat(result.output), result.output
    runs = MlflowClient(mlflow_uri).search_runs([MlflowClient(mlflow_uri).get_experiment_by_name("tiny").experiment_id])
    assert runs and {r.info.status for r in runs} == {"FAILED"}


# 5. non-finite training is never published ------------------------------------------------------


def test_infinite_lr_is_refused(tmp_path):
    job = write_job(tmp_path, **{"students.0.train.lr": float("inf")})
    result = CliRunner().invoke(app, ["run", str(job), "--dry-run"])
    assert result.exit_code == 2 and "students.0.train.lr" in result.output and "finite" in result.output


def test_student_whose_loss_goes_non_finite_is_not_exported_or_registered(committed, tmp_path, mlflow_uri):
    """Beside it, a healthy student trains at the same time: the failure starts nothing new but
    lets it finish, exported, registered and its run FINISHED; then the job fails."""
    from mlflow import MlflowClient

    work = tmp_path / "w"
    _copy_cache(committed, work / "cache")
    train = {"num_workers": 2, "cpus_per_worker": 0.25, "epochs": 1, "micro_batch_size": 4, "lr": 3e-3}
    diverging = {**train, "lr": 1e30, "warmup_ratio": 0.0, "grad_clip": 0.0}
    students = [
        {"name": "tiny-student", "architecture": TINY_STUDENT_ARCH, "train": diverging},
        {"name": "healthy", "architecture": TINY_STUDENT_ARCH, "train": train},
    ]
    job = write_job(tmp_path, students=students)
    result = CliRunner().invoke(app, ["train", str(job), "--workdir", str(work)])
    assert result.exit_code == 1, result.output
    assert "up to 2 at once" in _flat(result.output)
    assert "loss is" in _flat(result.output) and "nothing is exported" in _flat(result.output)
    assert not (work / "students" / "tiny-student" / "export").exists()
    assert (work / "students" / "healthy" / "export" / "config.json").exists()
    assert [m.name for m in _registered(mlflow_uri)] == ["tiny-healthy"]
    client = MlflowClient(mlflow_uri)
    runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id], "tags.`kdscale.stage` = 'student'")
    assert {r.info.run_name: r.info.status for r in runs} == {
        "student-tiny-student": "FAILED",
        "student-healthy": "FINISHED",
    }


# 6. the cache must be the job's; checkpoints are keyed by the effective seed ------------------


def test_train_refuses_another_seeds_cache(committed, tmp_path, mlflow_uri):
    work = tmp_path / "w"
    _copy_cache(committed, work / "cache")
    job = write_job(tmp_path, seed=1)
    result = CliRunner().invoke(app, ["train", str(job), "--workdir", str(work)])
    assert result.exit_code == 1 and "not made by this job's spec" in _flat(result.output)
    assert "targets.seed" in _flat(result.output) and not (work / "students").exists()
    named = write_job(tmp_path, dest="named.yaml", seed=1, **{"cache.uri": str(work / "cache")})
    dry = CliRunner().invoke(app, ["train", str(named), "--workdir", str(work), "--dry-run"])
    assert dry.exit_code == 0, dry.output  # named explicitly: the user asked for that cache


def test_checkpoint_key_follows_the_effective_seed(tmp_path):
    from kdscale.config import load_job
    from kdscale.student.trainer import training_run_name

    student = load_job(write_job(tmp_path)).students[0]
    assert training_run_name(student, "c", 0, None, {}) != training_run_name(student, "c", 1, None, {})
    assert training_run_name(student, "c", 0, None, {}) == training_run_name(student, "c", 0, None, {})


# 7. credentials ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "uri",
    [
        "postgresql://kd:pa/ss@word@db.internal:5432/mlflow",
        "http://kd:s3cr3t/@x@127.0.0.1:5000",
        "https://kd:plain@host/x",
    ],
)
def test_passwords_with_slash_or_at_are_masked(uri):
    from kdscale.tracking.redact import redact_text

    masked = redact_text(f"MLflow at {uri} (run 1)")
    assert "***" in masked and "pa/ss" not in masked and "s3cr3t" not in masked and "plain" not in masked
    assert masked.endswith(" (run 1)")


def test_corpus_url_password_never_reaches_the_manifest(tmp_path):
    import numpy as np
    from transformers import AutoTokenizer

    from kdscale.config import parse_job
    from kdscale.data.corpus import PackedCorpus
    from kdscale.precompute.plan import build_plan

    raw = json.loads(json.dumps(__import__("yaml").safe_load(write_job(tmp_path).read_text())))
    raw["corpus"]["paths"] = ["https://reader:hunter2-secret@corpus.example/docs.txt"]
    spec = parse_job(raw, base_dir=tmp_path, check_resources=False)
    tok = AutoTokenizer.from_pretrained(spec.teacher.tokenizer)
    rng = np.random.default_rng(0)
    corpus = PackedCorpus(seq_len=64, sources=raw["corpus"]["paths"], documents=1)
    corpus.train = [rng.integers(0, 500, 64).astype(np.int32) for _ in range(4)]
    corpus.heldout = [rng.integers(0, 500, 64).astype(np.int32)]
    plan = build_plan(spec, tok, corpus)
    text = plan.dataset.model_dump_json()
    assert "hunter2" not in text and "***" in text


def test_mlflow_prints_no_run_urls(tmp_path, monkeypatch):
    import os

    from kdscale.config import load_job
    from kdscale.tracking.lineage import Tracker

    monkeypatch.delenv("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", raising=False)
    Tracker(load_job(write_job(tmp_path)), sqlite_store(tmp_path, "m.db"))
    assert os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] == "true"


# 8. the experiment name cannot escape the tracking folder --------------------------------------


def test_experiment_name_with_path_is_refused(tmp_path):
    job = write_job(tmp_path, **{"tracking.experiment": "../../evil"})
    result = CliRunner().invoke(app, ["run", str(job), "--dry-run"])
    assert result.exit_code == 2 and "tracking.experiment" in result.output


# SIGKILLed jobs' runs, concurrent precomputes ---------------------------------------------------


def test_abandoned_running_runs_are_failed_by_the_next_invocation(tmp_path):
    import socket

    from mlflow import MlflowClient

    from kdscale.config import load_job
    from kdscale.tracking.lineage import HOST_TAG, JOB_TAG, PID_TAG, Tracker

    uri = sqlite_store(tmp_path, "m.db")
    tracker = Tracker(load_job(write_job(tmp_path)), uri)
    dead = tracker.client.create_run(
        tracker.experiment_id, tags={JOB_TAG: "tiny", HOST_TAG: host(), PID_TAG: "999999999"}
    ).info.run_id
    live = tracker.client.create_run(
        tracker.experiment_id,
        tags={JOB_TAG: "tiny", HOST_TAG: host(), PID_TAG: str(__import__("os").getpid())},
    ).info.run_id
    # same hostname, another pid namespace (a container sharing the tracking server): not ours to judge
    elsewhere = tracker.client.create_run(
        tracker.experiment_id,
        tags={JOB_TAG: "tiny", HOST_TAG: f"{socket.gethostname()}~00000000~1", PID_TAG: "999999999"},
    ).info.run_id
    tracker.start_job("run")
    client = MlflowClient(uri)
    assert client.get_run(dead).info.status == "FAILED" and client.get_run(live).info.status == "RUNNING"
    assert client.get_run(elsewhere).info.status == "RUNNING"


def test_a_second_precompute_on_a_leased_cache_is_refused(tmp_path):
    import socket
    import subprocess
    import sys
    import time

    from kdscale.cache.format import CacheFormatError
    from kdscale.cache.writer import acquire_lease, release_lease

    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / "_ledger").mkdir()
        (tmp_path / "_ledger" / "lease.json").write_text(json.dumps({"host": host(), "pid": holder.pid, "renewed": 0}))
        with pytest.raises(CacheFormatError, match="another precompute"):
            acquire_lease(str(tmp_path))
    finally:
        holder.kill()
        holder.wait()
    acquire_lease(str(tmp_path))  # its holder is gone: taken over
    release_lease(str(tmp_path))
    assert not (tmp_path / "_ledger" / "lease.json").exists()
    # a lease just renewed by a same-named host in another pid namespace: its pid means nothing here
    (tmp_path / "_ledger" / "lease.json").write_text(
        json.dumps({"host": f"{socket.gethostname()}~00000000~1", "pid": 999999999, "renewed": time.time()})
    )
    with pytest.raises(CacheFormatError, match="another precompute"):
        acquire_lease(str(tmp_path))


def test_cache_verify_names_a_deleted_shard_as_missing(committed, tmp_path):
    cache = _copy_cache(committed, tmp_path / "copy")
    (cache / "heldout-00000.parquet").unlink()
    result = CliRunner().invoke(app, ["cache", "verify", str(cache)])
    assert result.exit_code == 1 and "heldout-00000.parquet is missing" in _flat(result.output)


def test_manifest_unreadable_forms_are_refused(committed, tmp_path):
    for name, damage in (
        ("invalid", lambda p: p.write_text("{not json")),
        ("empty", lambda p: p.write_text("")),
        ("directory", lambda p: (p.unlink(), p.mkdir())),
    ):
        cache = _copy_cache(committed, tmp_path / name)
        damage(cache / MANIFEST)
        result = CliRunner().invoke(app, ["cache", "inspect", str(cache)])
        assert result.exit_code == 1 and MANIFEST in result.output, (name, result.output)


def test_verified_cache_has_no_problems(committed):
    m, found = problems(str(committed[1] / "cache"))
    assert found == [] and m.cache_id == open_manifest(str(committed[1] / "cache")).cache_id
