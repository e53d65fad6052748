"""Corpus ingestion: text, JSONL and Parquet sources, packing, and Ray Data tokenization that
gives exactly the single-process result."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kdscale.config import CorpusSpec, load_job
from kdscale.data.corpus import pack_corpus, seq_id, split_of
from kdscale.teachers import load_tokenizer
from tests.conftest import JOBS, write_job

DOCS = sorted((JOBS / "assets" / "tiny-corpus").glob("*.rst"))


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(load_job(JOBS / "tiny.yaml").teacher)


def _spec(paths, **kw):
    return CorpusSpec(paths=[str(p) for p in paths], seq_len=64, heldout_fraction=0.15, **kw)


def test_same_documents_as_jsonl_and_parquet_pack_identically(tmp_path, tok):
    texts = [d.read_text() for d in DOCS]
    (tmp_path / "a.jsonl").write_text(
        "\n".join(json.dumps({"body": t, "n": i}) for i, t in enumerate(texts[:3])) + "\n"
    )
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"body": t}) for t in texts[3:]) + "\n")
    pq.write_table(pa.table({"body": texts[:3]}), tmp_path / "a.parquet")
    pq.write_table(pa.table({"body": texts[3:]}), tmp_path / "b.parquet")
    text = pack_corpus(_spec(DOCS), tok)
    jsonl = pack_corpus(_spec([tmp_path / "*.jsonl"], format="jsonl", field="body"), tok)
    parquet = pack_corpus(_spec([tmp_path / "*.parquet"], format="parquet", field="body"), tok)
    assert text.documents == jsonl.documents == parquet.documents == len(DOCS)
    assert text.content_hash() == jsonl.content_hash() == parquet.content_hash()
    assert jsonl.sources == [str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")]


def test_max_tokens_and_split(tok):
    packed = pack_corpus(_spec(DOCS, max_tokens=4096), tok)
    assert packed.tokens == 4096
    assert all(len(r) == 64 and r.dtype == np.int32 for r in packed.train + packed.heldout)
    assert all(split_of(seq_id(r), 0.15) == "heldout" for r in packed.heldout)
    assert not any(split_of(seq_id(r), 0.15) == "heldout" for r in packed.train)


def test_validation_split_is_disjoint_stable_and_leaves_heldout_alone(tok):
    """Validation rows come out of train only: the held-out rows are exactly those of a corpus
    without a validation split, and two packings agree row for row."""
    spec = _spec(DOCS, validation_fraction=0.2)
    first, again, plain = pack_corpus(spec, tok), pack_corpus(spec, tok), pack_corpus(_spec(DOCS), tok)
    ids = {name: [seq_id(r) for r in rows] for name, rows in first.splits.items()}
    assert all(ids.values())
    assert len(set(ids["train"]) | set(ids["heldout"]) | set(ids["validation"])) == sum(map(len, ids.values()))
    assert ids == {name: [seq_id(r) for r in rows] for name, rows in again.splits.items()}
    assert ids["heldout"] == [seq_id(r) for r in plain.heldout]
    assert sorted(ids["train"] + ids["validation"]) == sorted(seq_id(r) for r in plain.train)
    assert all(split_of(i, 0.15, 0.2) == "validation" for i in ids["validation"])
    assert 0.1 < len(ids["validation"]) / sum(map(len, ids.values())) < 0.3
    assert first.content_hash() != plain.content_hash()
    assert pack_corpus(_spec(DOCS, validation_fraction=0.0), tok).content_hash() == plain.content_hash()


def test_fractions_must_leave_training_rows():
    with pytest.raises(ValueError, match="must leave rows to train on"):
        _spec(DOCS, validation_fraction=0.85)


def test_bad_jsonl_names_file_and_line(tmp_path, tok):
    (tmp_path / "x.jsonl").write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"other": 1}) + "\n")
    with pytest.raises(ValueError, match=r"x.jsonl:2: no string field 'text'"):
        pack_corpus(_spec([tmp_path / "x.jsonl"], format="jsonl"), tok)


def test_parquet_without_the_column(tmp_path, tok):
    pq.write_table(pa.table({"body": ["a b c"]}), tmp_path / "x.parquet")
    with pytest.raises(ValueError, match="no column 'text'"):
        pack_corpus(_spec([tmp_path / "x.parquet"], format="parquet"), tok)


@pytest.mark.ray
@pytest.mark.slow
def test_jsonl_corpus_on_s3_through_the_cli(ray_session, s3_bucket, tmp_path, mlflow_uri):
    import fsspec
    from typer.testing import CliRunner

    from kdscale.cache.reader import open_manifest
    from kdscale.cli import app

    with fsspec.open(f"{s3_bucket}/corpus/part-0.jsonl", "w") as f:
        for d in DOCS:
            f.write(json.dumps({"text": d.read_text()}) + "\n")
    job = write_job(tmp_path, **{"corpus.paths": [f"{s3_bucket}/corpus/*.jsonl"], "corpus.format": "jsonl"})
    result = CliRunner().invoke(app, ["precompute", str(job), "--workdir", str(tmp_path / "w")])
    assert result.exit_code == 0, result.output
    m = open_manifest(str(tmp_path / "w" / "cache"))
    assert m.dataset.sources == [f"{s3_bucket}/corpus/part-0.jsonl"]
    local = pack_corpus(_spec(DOCS, max_tokens=8192), load_tokenizer(load_job(JOBS / "tiny.yaml").teacher))
    assert m.dataset.content_hash == local.content_hash()
