"""Input units (kdscale.data.units) and their stream on Ray (kdscale.precompute.feed): cut from
file metadata alone, every document in exactly one unit, packed on Ray exactly as in-process."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kdscale.config import CorpusSpec, load_job
from kdscale.data.corpus import CorpusError, corpus_files, pack_corpus
from kdscale.data.units import dataset_identity, list_units, unit_documents
from kdscale.teachers import load_tokenizer
from tests.conftest import JOBS

DOCS = sorted((JOBS / "assets" / "tiny-corpus").glob("*.rst"))
TEXTS = [d.read_text() for d in DOCS]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(load_job(JOBS / "tiny.yaml").teacher)


def _jsonl(path, copies: int = 20) -> list[str]:
    """A JSONL file of the tiny corpus's documents, repeated with a counter (distinct lines)."""
    docs = [f"{i} {t}" for i in range(copies) for t in TEXTS]
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return docs


def _spec(paths, **kw) -> CorpusSpec:
    return CorpusSpec(paths=[str(p) for p in paths], seq_len=64, heldout_fraction=0.15, **kw)


def test_a_large_jsonl_file_is_cut_into_ranges_that_hold_every_line_once(tmp_path):
    docs = _jsonl(tmp_path / "big.jsonl")
    size = (tmp_path / "big.jsonl").stat().st_size
    for unit_bytes in (1024, 7777, 50_000, size + 1):
        units = list_units([str(tmp_path / "big.jsonl")], "jsonl", unit_bytes)
        assert len(units) == -(-size // unit_bytes)
        assert [d for u in units for d in unit_documents(u, "text")] == docs


def test_small_files_are_grouped_and_units_come_from_metadata_alone(tmp_path):
    for i in range(12):
        (tmp_path / f"f{i:02d}.jsonl").write_text(json.dumps({"text": TEXTS[i % len(TEXTS)]}) + "\n")
    files = sorted(str(p) for p in tmp_path.glob("*.jsonl"))
    budget = 3 * max((tmp_path / f).stat().st_size for f in files)
    units = list_units(files, "jsonl", budget)
    assert 1 < len(units) < 12 and [p.uri for u in units for p in u.pieces] == files
    assert all(u.bytes <= budget for u in units)
    assert list_units(files, "jsonl", budget) == units  # the same listing, nothing read
    packing = {"seq_len": 64}
    assert dataset_identity(units, packing) == dataset_identity(list_units(files, "jsonl", budget), packing)
    assert dataset_identity(units, packing) != dataset_identity(units, {"seq_len": 128})


def test_parquet_row_groups_are_units(tmp_path):
    table = pa.table({"text": [f"{i} {t}" for i in range(10) for t in TEXTS]})
    pq.write_table(table, tmp_path / "c.parquet", row_group_size=6)
    units = list_units([str(tmp_path / "c.parquet")], "parquet", 1)
    assert len(units) == 10 and all(u.pieces[0].end - u.pieces[0].start == 1 for u in units)
    assert [d for u in units for d in unit_documents(u, "text")] == table.column("text").to_pylist()


def test_a_bad_line_in_a_later_range_names_the_file_and_byte_offset(tmp_path):
    _jsonl(tmp_path / "big.jsonl", copies=3)
    with open(tmp_path / "big.jsonl", "a") as f:
        f.write("{not json\n")
    units = list_units([str(tmp_path / "big.jsonl")], "jsonl", 4096)
    offset = (tmp_path / "big.jsonl").stat().st_size - len("{not json\n")
    with pytest.raises(CorpusError, match=rf"big.jsonl:byte {offset}: not JSON"):
        for u in units:
            list(unit_documents(u, "text"))


@pytest.mark.ray
def test_the_stream_on_ray_packs_what_pack_corpus_packs(ray_session, tok, tmp_path):
    """Units tokenized by Ray tasks, in order, cut at max_tokens inside a unit: the same rows,
    splits and content hash as in-process packing; one large file by several tasks."""
    from kdscale.precompute.feed import UnitFeed

    _jsonl(tmp_path / "big.jsonl", copies=6)
    for max_tokens in (None, 15_000):
        spec = _spec([tmp_path / "big.jsonl"], format="jsonl", unit_bytes=20_000, max_tokens=max_tokens)
        local = pack_corpus(spec, tok)
        units = list_units(corpus_files(spec), "jsonl", spec.unit_bytes)
        feed = UnitFeed(_Job(spec), tok, units, len(tok), lookahead=3)
        got = [(meta, ray_session.get(ref)) for meta, ref in feed]
        assert len(got) > 1  # more than one task read the one file
        assert [m.content_hash for m, _ in got] == local.unit_hashes
        rows = np.concatenate([p.rows for _, p in got])
        assert rows.shape[0] * 64 == local.tokens and (max_tokens is None or local.tokens >= max_tokens)
        expected = sorted(map(bytes, local.train + local.heldout))
        assert sorted(map(bytes, rows)) == expected


def test_the_rank_sample_is_the_first_units_and_only_they_carry_histograms(ray_session, tok, tmp_path):
    """The rank table counts the first units up to the sample size, in corpus order; units past
    the sample (beyond the ones packed ahead) send no histogram to the driver."""
    from kdscale.cache.idcodec import rank_from_counts
    from kdscale.precompute.feed import begin_stream

    _jsonl(tmp_path / "big.jsonl", copies=6)
    spec = _spec([tmp_path / "big.jsonl"], format="jsonl", unit_bytes=5_000)
    local = pack_corpus(spec, tok)
    units = list_units(corpus_files(spec), "jsonl", spec.unit_bytes)
    stream = begin_stream(_Job(spec), tok, units, len(tok), sample_tokens=2_000)
    got = [(meta, ray_session.get(ref)) for meta, ref in stream.units()]
    assert [m.content_hash for m, _ in got] == local.unit_hashes and not stream.complete
    sampled = [p for _, p in got[: len(stream.sample)]]
    counts = np.bincount(np.concatenate([p.rows.ravel() for p in sampled]), minlength=len(tok))
    assert counts.sum() >= 2_000 > counts.sum() - sampled[-1].rows.size
    np.testing.assert_array_equal(stream.rank_order, rank_from_counts(counts, len(tok)))
    assert got[-1][0].histogram is None and len(got) > len(stream.sample) + 8  # lookahead ≤ CPUs + 1


class _Job:
    def __init__(self, corpus):
        self.corpus = corpus


@pytest.mark.ray
@pytest.mark.slow
def test_the_teacher_computes_units_as_they_are_packed_holding_every_cpu(
    ray_session, tmp_path, mlflow_uri, monkeypatch
):
    """A rank sample of one unit, so the teacher starts while later units are still to be packed,
    and two teacher actors holding both of the session's CPUs: packing tasks reserve none, so the
    stream never waits for a CPU the teacher holds. The cache commits, verifies and lists its units."""
    from typer.testing import CliRunner

    from kdscale.cache.verify import problems
    from kdscale.cli import app
    from kdscale.precompute import feed
    from tests.conftest import write_job

    monkeypatch.setattr(feed, "RANK_SAMPLE_TOKENS", 1)
    job = write_job(tmp_path, **{"corpus.unit_bytes": 8192, "teacher.num_cpus": 1.0, "teacher.replicas": 2})
    result = CliRunner().invoke(app, ["precompute", str(job), "--workdir", str(tmp_path / "w")])
    assert result.exit_code == 0, result.output
    cache = str(tmp_path / "w" / "cache")
    manifest, found = problems(cache)
    assert found == [] and len(manifest.dataset.units) > 2
    assert all(s.node and "/" in s.node for s in manifest.shards)  # IP/node-id of the writing actor
    assert sum(u.tokens for u in manifest.dataset.units) == manifest.dataset.tokens == 8192
    inspect = CliRunner().invoke(app, ["cache", "inspect", cache, "--json"])
    assert json.loads(inspect.output)["units"]["count"] == len(manifest.dataset.units)
