"""Several students from one cache in one job: fresh (ZeRO-2), initialised from the teacher's own
layers (ZeRO-3), and pretrained (ZeRO-0), two at a time; each its own MLflow run; bad student
specs refused."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from kdscale.cli import app
from kdscale.config import load_job
from kdscale.teachers import load_teacher, load_tokenizer
from tests.conftest import TINY_STUDENT_ARCH, llama_config, write_job

TRAIN = {
    "num_workers": 2,
    "cpus_per_worker": 0.25,  # two students at once on the session's 2-CPU Ray (and a CPU for reading)
    "epochs": 1,
    "micro_batch_size": 4,
    "lr": 3.0e-3,
    "eval_every_steps": 3,
}


def _pretrained(folder, vocab):
    cfg = llama_config(**TINY_STUDENT_ARCH, vocab_size=vocab, max_position_embeddings=256)
    torch.manual_seed(5)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
    return str(folder)


@pytest.mark.ray
@pytest.mark.slow
def test_students_from_one_cache_two_at_a_time(ray_session, tmp_path, mlflow_uri):
    write_job(tmp_path)
    fresh = {
        "architecture": TINY_STUDENT_ARCH,
        "loss": {"alpha": 0.5, "divergence": "jsd"},
        "train": {**TRAIN, "zero_stage": 2},
    }
    students = [
        {"name": "fresh", **fresh},
        {"name": "twin", **fresh},  # the same settings, trained at the same time as fresh
        {
            "name": "distil",
            "init": "teacher_layers",
            "teacher_layers": [1],
            "loss": {"alpha": 0.8, "divergence": "reverse_kl"},
            "train": {**TRAIN, "zero_stage": 3},
        },
        {
            "name": "warm",
            "init": "pretrained",
            "path": _pretrained(tmp_path / "pre", 512),
            "loss": {"alpha": 1.0, "divergence": "tvd"},
            "train": {**TRAIN, "zero_stage": 0},
        },
    ]
    job = write_job(tmp_path, students=students)
    workdir = tmp_path / "w"
    result = CliRunner().invoke(app, ["run", str(job), "--workdir", str(workdir)])
    assert result.exit_code == 0, result.output
    assert "Students train up to 2 at once" in " ".join(result.output.split())
    summary = json.loads((workdir / "summary.json").read_text())
    assert set(summary["students"]) == {"fresh", "twin", "distil", "warm"}
    st = summary["students"]
    # fresh and its twin trained at the same time, into the same numbers: nothing crossed between them
    assert st["fresh"]["trained_from"] < st["twin"]["trained_until"]
    assert st["twin"]["trained_from"] < st["fresh"]["trained_until"]
    assert st["twin"]["loss_history"] == st["fresh"]["loss_history"]
    assert st["twin"]["heldout_ce"] == st["fresh"]["heldout_ce"]
    assert st["twin"]["heldout_ce_untrained"] == st["fresh"]["heldout_ce_untrained"]  # seeded from two threads

    from mlflow import MlflowClient

    client = MlflowClient(mlflow_uri)
    cache_id = summary["cache"]["cache_id"]
    run_ids = {s["mlflow_run_id"] for s in summary["students"].values()}
    assert len(run_ids) == 4
    for name, st in summary["students"].items():
        run = client.get_run(st["mlflow_run_id"])
        assert run.data.tags["kdscale.cache_id"] == cache_id and run.info.status == "FINISHED"
        assert run.data.params["student"] == name
        assert AutoModelForCausalLM.from_pretrained(st["export"]).config.vocab_size == 512
        assert st["loss_history"][-1] < st["loss_history"][0], name
        # held-out CE during training, scored across both ranks (collectively under ZeRO-3),
        # ends on the same weights the export holds
        assert [e["step"] for e in st["evals"]][-1] == st["steps"], name
        assert st["evals"][-1]["heldout_ce"] == pytest.approx(st["heldout_ce"], rel=1e-4), name
    assert client.get_run(summary["students"]["distil"]["mlflow_run_id"]).data.params["train.zero_stage"] == "3"

    # the teacher_layers student started as a copy of teacher layer 1 (+ embeddings, norm, head)
    spec = load_job(job)
    teacher = load_teacher(spec.teacher, len(load_tokenizer(spec.teacher)), spec.seed).state_dict()
    init = load_file(str(workdir / "students" / "distil" / "init" / "model.safetensors"))
    torch.testing.assert_close(init["model.layers.0.mlp.up_proj.weight"], teacher["model.layers.1.mlp.up_proj.weight"])
    torch.testing.assert_close(init["model.embed_tokens.weight"], teacher["model.embed_tokens.weight"])


def _refused(tmp_path, students, *needles):
    job = write_job(tmp_path, students=students)
    result = CliRunner().invoke(app, ["train", str(job), "--workdir", str(tmp_path / "w")])
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    for needle in needles:
        assert needle in text, text
    assert not (tmp_path / "w").exists()


def test_student_with_another_vocabulary_is_refused(tmp_path, mlflow_uri):
    write_job(tmp_path)
    students = [{"name": "other", "init": "pretrained", "path": _pretrained(tmp_path / "pre", 300)}]
    _refused(tmp_path, students, "students.0", "vocabulary 300 differs from the teacher tokenizer's 512")


def test_teacher_layers_out_of_range_and_bad_zero_stage(tmp_path, mlflow_uri):
    write_job(tmp_path)
    students = [{"name": "a", "init": "teacher_layers", "teacher_layers": [0, 5]}]
    _refused(tmp_path, students, "students.0.teacher_layers", "distinct indices in [0, 2)")
    job = write_job(tmp_path, **{"students.0.train.zero_stage": 5})
    result = CliRunner().invoke(app, ["train", str(job), "--workdir", str(tmp_path / "w")])
    assert result.exit_code == 2 and "students.0.train.zero_stage" in result.output


@pytest.mark.ray
def test_more_workers_than_the_cluster_holds(ray_session, tmp_path, mlflow_uri):
    job = write_job(tmp_path, **{"students.0.train.num_workers": 8})
    result = CliRunner().invoke(app, ["run", str(job), "--workdir", str(tmp_path / "w")])
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert "students.0.train.num_workers" in text and "the Ray cluster has 2" in text
    assert not (tmp_path / "w").exists()


@pytest.mark.ray
@pytest.mark.slow
def test_online_student_beside_a_cache_student(ray_session, tmp_path, mlflow_uri):
    """Online KD (teacher inside the training workers) and cache KD in one job: same rows, same
    held-out split, same teacher statistics; only the cache student is linked to the cache."""
    write_job(tmp_path)
    arch = TINY_STUDENT_ARCH
    students = [
        {"name": "cached", "architecture": arch, "train": {**TRAIN, "epochs": 2}},
        {"name": "online", "targets": "online", "architecture": arch, "train": {**TRAIN, "epochs": 2}},
    ]
    job = write_job(tmp_path, students=students)
    result = CliRunner().invoke(app, ["run", str(job), "--workdir", str(tmp_path / "w")])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "w" / "summary.json").read_text())
    cached, online = summary["students"]["cached"], summary["students"]["online"]
    assert online["teacher_heldout_ce"] == pytest.approx(cached["teacher_heldout_ce"], rel=1e-4)
    assert online["rows"] == cached["rows"] and online["steps"] == cached["steps"]
    assert online["loss_history"][-1] < online["loss_history"][0]
    assert online["heldout_ce"] < online["heldout_ce_untrained"]
    assert online["cache_id"] is None and cached["cache_id"] == summary["cache"]["cache_id"]

    from mlflow import MlflowClient

    run = MlflowClient(mlflow_uri).get_run(online["mlflow_run_id"])
    assert run.data.tags["kdscale.targets"] == "online" and "kdscale.cache_id" not in run.data.tags
    assert not run.inputs.dataset_inputs
