"""End to end through the CLI on jobs/tiny.yaml: real local Ray, real DeepSpeed (ZeRO-2, two Ray
Train workers, gloo), real MLflow (sqlite), real Parquet cache."""

from __future__ import annotations

import json
import os
import tempfile

import pytest
from typer.testing import CliRunner

from kdscale import fs
from kdscale.cache.reader import open_manifest
from kdscale.cache.verify import problems
from kdscale.cli import app
from kdscale.student.local_checkpoints import folders as checkpoint_folders
from tests.conftest import TINY_STUDENT_ARCH, sqlite_store, write_job

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture(scope="module")
def tiny_run(ray_session, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    job = write_job(tmp)
    workdir = tmp / "work"
    uri = sqlite_store(tmp)
    old = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    driver_tmp = tmp / "driver-tmp"  # the driver's temporary folder during the run, to see what it leaves
    driver_tmp.mkdir()
    ckpt_before = set(checkpoint_folders("tiny-student"))  # left by earlier tests' killed workers, if any
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tempfile, "tempdir", str(driver_tmp))
        result = CliRunner().invoke(app, ["run", str(job), "--workdir", str(workdir)])
    yield {
        "driver_tmp_left": sorted(p.name for p in driver_tmp.iterdir()),
        "ckpt_left": sorted(set(checkpoint_folders("tiny-student")) - ckpt_before),
        "result": result,
        "job": job,
        "workdir": workdir,
        "uri": uri,
        "summary": json.loads((workdir / "summary.json").read_text()) if (workdir / "summary.json").exists() else None,
    }
    if old is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = old


def test_run_succeeds_and_lays_out_the_workdir(tiny_run):
    assert tiny_run["result"].exit_code == 0, tiny_run["result"].output
    wd = tiny_run["workdir"]
    assert (wd / "cache" / "manifest.json").exists()
    assert (wd / "students" / "tiny-student" / "export" / "config.json").exists()
    assert (wd / "students" / "tiny-student" / "checkpoints").is_dir()
    assert tiny_run["ckpt_left"] == []  # each epoch's checkpoint folder went to Ray Train's storage, none left in /tmp
    # the final model was copied out of Ray Train's storage for evaluation and export, then removed
    # (Ray's Checkpoint.to_directory() left a checkpoint_tmp_* copy of every student in /tmp)
    assert not [n for n in tiny_run["driver_tmp_left"] if n.startswith(("checkpoint_tmp_", "kdscale-final-"))]
    s = tiny_run["summary"]
    for key in ("uri", "cache_id", "tokens", "bytes_per_token"):
        assert key in s["cache"]
    st = s["students"]["tiny-student"]
    for key in ("heldout_ce", "teacher_heldout_ce", "heldout_ce_untrained", "export", "mlflow_run_id"):
        assert st[key] is not None
    # bits per byte of the held-out text (from the cache's token bytes), comparable across tokenizers
    assert st["teacher_bits_per_byte"] > 0 and st["bits_per_byte"] > 0 and "aligned_fraction" not in st
    # nats per token over bytes per token: bits/byte = CE x labelled positions / (ln 2 x their bytes)
    per_byte = st["teacher_bits_per_byte"] / st["teacher_heldout_ce"]  # the same rows: the same ratio
    assert st["bits_per_byte"] / st["heldout_ce"] == pytest.approx(per_byte)
    assert len(st["heldout_row_bits_per_byte"]) == st["rows"]


def test_manifest_matches_shards(tiny_run):
    cache = str(tiny_run["workdir"] / "cache")
    m = open_manifest(cache)
    assert m.cache_id == tiny_run["summary"]["cache"]["cache_id"]
    assert problems(cache)[1] == []
    on_disk = sorted(p for p in fs.listdir(cache) if p.endswith(".parquet"))
    assert m.alignment is not None  # the teacher vocabulary's bytes: students with their own tokenizer align by them
    assert on_disk == sorted([s.path for s in m.shards] + [m.id_coding["rank_file"], m.alignment["token_bytes"]])
    assert m.totals["tokens"] == tiny_run["summary"]["cache"]["tokens"] == 8192


def test_student_learns(tiny_run):
    st = tiny_run["summary"]["students"]["tiny-student"]
    losses = st["loss_history"]
    assert len(losses) == st["steps"] >= 10
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.2
    assert st["heldout_ce"] < st["heldout_ce_untrained"] - 0.2


def test_heldout_ce_is_tracked_during_training(tiny_run):
    st = tiny_run["summary"]["students"]["tiny-student"]
    steps = [e["step"] for e in st["evals"]]
    expected = list(range(8, st["steps"] + 1, 8))  # every 8 steps (jobs/tiny.yaml), and the last step
    assert steps == expected + ([st["steps"]] if st["steps"] % 8 else [])
    assert [e["tokens"] for e in st["evals"]] == [s * 2 * 4 * 64 for s in steps]  # 2 workers x 4 rows x 64 tokens
    assert st["evals"][-1]["heldout_ce"] == pytest.approx(st["heldout_ce"], rel=1e-4)
    assert st["evals"][0]["heldout_ce"] > st["evals"][-1]["heldout_ce"]
    from mlflow import MlflowClient

    history = MlflowClient(tiny_run["uri"]).get_metric_history(st["mlflow_run_id"], "eval/heldout_ce")
    assert [m.step for m in history] == steps


def test_mlflow_holds_runs_and_the_cache_link(tiny_run):
    from mlflow import MlflowClient

    client = MlflowClient(tiny_run["uri"])
    s = tiny_run["summary"]
    cache_id = s["cache"]["cache_id"]
    exp = client.get_experiment_by_name("tiny")
    runs = {r.info.run_id: r for r in client.search_runs([exp.experiment_id])}
    parent = runs[s["mlflow"]["parent_run_id"]]
    children = [r for r in runs.values() if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    stages = sorted(r.data.tags["kdscale.stage"] for r in children)
    assert stages == ["precompute", "student"]
    assert all(r.info.status == "FINISHED" for r in [parent, *children])
    student = runs[s["students"]["tiny-student"]["mlflow_run_id"]]
    assert student.data.tags["kdscale.cache_id"] == cache_id
    digests = {d.dataset.digest for d in student.inputs.dataset_inputs}
    assert digests == {cache_id}
    precompute = runs[s["mlflow"]["precompute_run_id"]]
    assert {d.dataset.digest for d in precompute.inputs.dataset_inputs} == {cache_id}
    assert precompute.data.metrics["bytes_per_token"] > 0
    history = client.get_metric_history(student.info.run_id, "train/loss")
    assert len(history) == s["students"]["tiny-student"]["steps"]
    assert "heldout/heldout_ce" in student.data.metrics


def test_export_loads_and_generates(tiny_run):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    export = tiny_run["summary"]["students"]["tiny-student"]["export"]
    model = AutoModelForCausalLM.from_pretrained(export)
    tok = AutoTokenizer.from_pretrained(export)
    ids = tok("import bisect", return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] == ids.shape[1] + 8


def test_cache_inspect_json(tiny_run):
    result = CliRunner().invoke(app, ["cache", "inspect", str(tiny_run["workdir"] / "cache"), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["cache_id"] == tiny_run["summary"]["cache"]["cache_id"]
    assert info["kind"] == "sampled" and info["params"]["num_samples"] == 50
    assert info["tokens"] == 8192 and info["bytes_per_token"] > 0
    assert 1 <= info["mean_ids_per_position"] <= 50
    assert info["tokenizer"]["vocab_size"] == 512


def test_rerun_precompute_reuses_the_cache_and_eval_reproduces(tiny_run):
    cache = tiny_run["workdir"] / "cache"
    before = {p: (cache / p).stat().st_mtime_ns for p in fs.listdir(str(cache)) if p.endswith(".parquet")}
    result = CliRunner().invoke(app, ["precompute", str(tiny_run["job"]), "--workdir", str(tiny_run["workdir"])])
    assert result.exit_code == 0, result.output
    after = {p: (cache / p).stat().st_mtime_ns for p in before}
    assert before == after
    summary = json.loads((tiny_run["workdir"] / "summary.json").read_text())
    assert summary["cache"]["reused"] is True
    result = CliRunner().invoke(app, ["eval", str(tiny_run["job"]), "--workdir", str(tiny_run["workdir"])])
    assert result.exit_code == 0, result.output
    st = json.loads((tiny_run["workdir"] / "summary.json").read_text())["students"]["tiny-student"]
    assert st["heldout_ce"] == pytest.approx(tiny_run["summary"]["students"]["tiny-student"]["heldout_ce"], rel=1e-5)
    assert st["eval_run_id"]


def test_dry_run_prints_plan_and_writes_nothing(tmp_path, ray_session):
    job = write_job(tmp_path)
    result = CliRunner().invoke(app, ["run", str(job), "--workdir", str(tmp_path / "w"), "--dry-run"])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.output)
    assert plan["students"]["tiny-student"]["workers"] == 2
    assert plan["precompute"]["cache"] == "absent: computed" and len(plan["precompute"]["cache_id"]) == 32
    # 2 workers x 0.5 CPU: the session's 2 CPUs hold one such student beside a CPU for reading
    assert plan["students_train"] == "one after another (the Ray cluster holds one at a time beside a CPU for reading)"
    assert not (tmp_path / "w").exists()
    quarter = {"architecture": TINY_STUDENT_ARCH, "train": {"num_workers": 2, "cpus_per_worker": 0.25}}
    students = [{"name": n, **quarter} for n in "abc"]
    for limit, says in (("auto", "up to 2 at once (2 CPUs, 0 GPUs in the Ray cluster"), (1, "parallel_students: 1")):
        job = write_job(tmp_path, students=students, parallel_students=limit)
        result = CliRunner().invoke(app, ["run", str(job), "--workdir", str(tmp_path / "w"), "--dry-run"])
        assert result.exit_code == 0, result.output
        assert says in json.loads(result.output)["students_train"]


def test_student_is_registered_and_lineage_prints(tiny_run):
    s = tiny_run["summary"]
    assert s["students"]["tiny-student"]["registered_model"] == {"name": "tiny-tiny-student", "version": "1"}
    result = CliRunner().invoke(app, ["lineage", "tiny-tiny-student/1", "--tracking-uri", tiny_run["uri"]])
    assert result.exit_code == 0, result.output
    for text in ("tiny-tiny-student", s["cache"]["cache_id"], "tiny-random-llama", "content_hash"):
        assert text in result.output
    by_cache = CliRunner().invoke(
        app, ["lineage", "--cache", str(tiny_run["workdir"] / "cache"), "--tracking-uri", tiny_run["uri"]]
    )
    assert by_cache.exit_code == 0, by_cache.output
    assert "student tiny-student" in by_cache.output and "tiny-tiny-student v1" in by_cache.output


def test_rerun_train_reuses_the_finished_student_without_starting_workers(tiny_run, monkeypatch):
    """A finished student's checkpoint is reused by the driver alone: no Ray Train run is made
    (it used to start one only to find every epoch done), and the student is the same."""
    import kdscale.student.trainer as trainer

    def no_worker_group(*args, **kwargs):
        raise AssertionError("a Ray Train run was started for a finished student")

    monkeypatch.setattr(trainer, "ray_trainer", no_worker_group)
    workdir = tiny_run["workdir"]
    before = tiny_run["summary"]["students"]["tiny-student"]
    result = CliRunner().invoke(app, ["train", str(tiny_run["job"]), "--workdir", str(workdir)])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "Student tiny-student: already trained (2 epochs)" in text and "without starting its workers" in text
    after = json.loads((workdir / "summary.json").read_text())["students"]["tiny-student"]
    assert after["training_reused"] is True and before["training_reused"] is False
    assert after["trained_from"] is None and before["trained_from"] < before["trained_until"]
    assert after["heldout_ce"] == pytest.approx(before["heldout_ce"], rel=1e-6)
    assert after["loss_history"] == before["loss_history"] and after["steps"] == before["steps"]
    assert after["registered_model"]["version"] == "2"  # the same weights, exported and registered again
