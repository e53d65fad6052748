"""Precompute stage: teachers from a Hugging Face folder, sharded over pipeline stages on Ray, and
bad inputs refused before anything is written."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from kdscale.cache.reader import batch_targets, load_rank_order, open_manifest, read_split
from kdscale.cli import app
from tests.conftest import llama_config, write_job


def hf_teacher(folder, layers: int = 4, tokenizer_dir=None):
    """A tiny random Llama saved as safetensors with its tokenizer, like a downloaded model."""
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg = llama_config(
        num_hidden_layers=layers,
        vocab_size=len(tok),
        max_position_embeddings=128,
        initializer_range=0.2,
        tie_word_embeddings=False,
    )
    torch.manual_seed(3)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _hf_job(tmp_path, dest="hf.yaml", teacher_overrides=None, **overrides):
    job = write_job(tmp_path)  # copies assets
    folder = tmp_path / "teacher"
    if not folder.exists():
        hf_teacher(folder, tokenizer_dir=tmp_path / "assets" / "tiny-tokenizer")
    teacher = {
        "name": "tiny-hf",
        "path": str(folder),
        "replicas": 1,
        "batch_size": 4,
        "num_cpus": 0.5,
        **(teacher_overrides or {}),
    }
    return write_job(
        tmp_path, dest=dest, teacher=teacher, **{"cache.targets": {"kind": "topk", "k": 8}, **overrides}
    ), job


@pytest.mark.ray
@pytest.mark.slow
def test_sharded_teacher_on_ray_matches_unsharded(ray_session, tmp_path, mlflow_uri):
    settings = {"corpus.max_tokens": 4096, "cache.rows_per_shard": 8}
    job, _ = _hf_job(tmp_path, **settings)
    whole = CliRunner().invoke(app, ["precompute", str(job), "--workdir", str(tmp_path / "whole")])
    assert whole.exit_code == 0, whole.output
    sharded_job, _ = _hf_job(tmp_path, dest="sharded.yaml", teacher_overrides={"shards": 2, "replicas": 2}, **settings)
    sharded = CliRunner().invoke(app, ["precompute", str(sharded_job), "--workdir", str(tmp_path / "sharded")])
    assert sharded.exit_code == 0, sharded.output
    assert "2 x 2 stages" in sharded.output

    a, b = (str(tmp_path / d / "cache") for d in ("whole", "sharded"))
    ma, mb = open_manifest(a), open_manifest(b)
    assert ma.cache_id == mb.cache_id  # parallelism is not part of what the cache means
    ranges = mb.teacher.parallelism["layer_ranges"]
    assert len(ranges) == 2 and ranges[0][0] == 0 and ranges[0][1] == ranges[1][0] and ranges[1][1] == 4
    assert mb.teacher.parallelism["shards"] == 2
    ta, tb = read_split(a, ma, "train"), read_split(b, mb, "train")
    assert ta.column("seq_id").to_pylist() == tb.column("seq_id").to_pylist()
    xa = batch_targets(ta, ma, load_rank_order(a, ma))
    xb = batch_targets(tb, mb, load_rank_order(b, mb))
    assert torch.equal(xa.ids, xb.ids)
    assert (xa.probs - xb.probs).abs().max() <= 1e-5
    np.testing.assert_allclose(ta.column("teacher_nll").to_numpy(), tb.column("teacher_nll").to_numpy(), rtol=1e-5)


def _refused(args, workdir, *needles):
    result = CliRunner().invoke(app, [*args, "--workdir", str(workdir)])
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    for needle in needles:
        assert needle in text
    assert not workdir.exists()


def test_missing_weights_refused_before_work(tmp_path, mlflow_uri):
    job, _ = _hf_job(tmp_path)
    (tmp_path / "teacher" / "model.safetensors").unlink()
    _refused(["precompute", str(job)], tmp_path / "w", "teacher.path", "no weight files")


def test_truncated_weights_refused_before_work(tmp_path, mlflow_uri):
    job, _ = _hf_job(tmp_path)
    weights = tmp_path / "teacher" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    _refused(["run", str(job)], tmp_path / "w", "corrupt weights file", "truncated")


def test_corrupt_gguf_refused(tmp_path, mlflow_uri):
    (tmp_path / "g").mkdir()
    (tmp_path / "g" / "model.gguf").write_bytes(b"NOTGGUF" * 10)
    job = write_job(tmp_path, teacher={"name": "g", "path": str(tmp_path / "g"), "gguf_file": "model.gguf"})
    _refused(["run", str(job)], tmp_path / "w", "not a GGUF file")


def test_corpus_without_tokens_refused(tmp_path, mlflow_uri):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("   \n\n")
    (tmp_path / "empty" / "b.txt").write_text("tiny")
    job = write_job(tmp_path, **{"corpus.paths": [str(tmp_path / "empty" / "*.txt")]})
    _refused(["precompute", str(job)], tmp_path / "w", "yields no training sequences", "1 non-empty documents")


def test_sequence_longer_than_context_refused(tmp_path, mlflow_uri):
    job = write_job(tmp_path, **{"corpus.seq_len": 512})
    _refused(["run", str(job)], tmp_path / "w", "corpus.seq_len", "exceeds the teacher's context length 256")


def test_more_shards_than_layers_refused(tmp_path, mlflow_uri):
    job = write_job(tmp_path, **{"teacher.shards": 3})
    _refused(["precompute", str(job)], tmp_path / "w", "teacher.shards", "3 stages for a teacher with only 2 layers")


def test_dry_run_of_a_sharded_job_shows_it(tmp_path):
    job = write_job(tmp_path, **{"teacher.shards": 2})
    result = CliRunner().invoke(app, ["precompute", str(job), "--dry-run", "--workdir", str(tmp_path / "w")])
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "w").exists()
    shutil.rmtree(tmp_path / "assets")
