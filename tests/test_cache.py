"""Target extraction, the shard/manifest commit protocol, and the reader's refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from kdscale import fs
from kdscale.cache import targets
from kdscale.cache.format import MANIFEST, CacheFormatError
from kdscale.cache.reader import (
    SparseTargets,
    batch_input_ids,
    batch_targets,
    check_tokenizer,
    load_rank_order,
    open_manifest,
    read_split,
)
from kdscale.cache.store import CacheWriter
from kdscale.cache.verify import problems
from kdscale.cache.writer import finished_shards, start_or_check_plan
from kdscale.config import load_job
from kdscale.data.corpus import pack_corpus, seq_id, split_of
from kdscale.precompute.plan import build_plan
from kdscale.precompute.worker import TeacherWorker
from kdscale.teachers import load_tokenizer
from tests.conftest import write_job


def test_sampled_targets_are_deterministic_and_consistent():
    logits = torch.randn(7, 40) * 2
    a = targets.sampled(logits, 1.0, 50, targets.row_generator(0, "abc"))
    b = targets.sampled(logits, 1.0, 50, targets.row_generator(0, "abc"))
    c = targets.sampled(logits, 1.0, 50, targets.row_generator(1, "abc"))
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    assert not np.array_equal(a["target_ids"], c["target_ids"])
    lengths = a["target_lengths"].astype(int)
    assert lengths.sum() == len(a["target_ids"]) == len(a["target_counts"])
    start = 0
    for n in lengths:  # per position: ids strictly ascending, counts sum to N
        seg = a["target_ids"][start : start + n]
        assert np.all(np.diff(seg) > 0)
        assert a["target_counts"][start : start + n].sum() == 50
        start += n


def test_sampled_weights_are_an_unbiased_estimate():
    """E[counts/N] = softmax(z/T): average many seeded draws of one distribution."""
    logits = torch.randn(1, 12) * 1.5
    p = torch.softmax(logits / 2.0, dim=-1)[0].numpy()
    est = np.zeros(12)
    trials = 400
    for s in range(trials):
        out = targets.sampled(logits, 2.0, 50, targets.row_generator(s, "x"))
        est[out["target_ids"]] += out["target_counts"] / 50
    est /= trials
    se = np.sqrt(p * (1 - p) / (50 * trials))
    assert np.all(np.abs(est - p) < 5 * se + 1e-9)


def test_topk_tail_mass():
    logits = torch.randn(3, 30)
    out = targets.topk(logits, 1.0, 5)
    probs = torch.softmax(logits, -1)
    top = probs.topk(5, -1)
    np.testing.assert_allclose(out["tail_mass"], (1 - top.values.sum(-1)).numpy(), atol=1e-6)
    np.testing.assert_array_equal(out["target_ids"].reshape(3, 5), top.indices.numpy())


def test_corpus_packing_and_heldout_split(tmp_path):
    spec = load_job(write_job(tmp_path))
    tok = load_tokenizer(spec.teacher)
    packed = pack_corpus(spec.corpus, tok)
    assert packed.tokens == spec.corpus.max_tokens
    assert all(len(r) == spec.corpus.seq_len for r in packed.train + packed.heldout)
    assert all(split_of(seq_id(r), spec.corpus.heldout_fraction) == "heldout" for r in packed.heldout)
    assert not any(split_of(seq_id(r), spec.corpus.heldout_fraction) == "heldout" for r in packed.train)
    assert packed.content_hash() == pack_corpus(spec.corpus, tok).content_hash()


def build_cache(tmp, **overrides):
    """A real cache written by a TeacherWorker (no Ray) with the commit protocol."""
    spec = load_job(write_job(tmp, **{"cache.rows_per_shard": 40, **overrides}))
    tok = load_tokenizer(spec.teacher)
    plan = build_plan(spec, tok, pack_corpus(spec.corpus, tok))  # rows packed here: no Ray
    uri = str(tmp / "cache")
    worker = TeacherWorker(
        spec.teacher, vocab_size=len(tok), seed=spec.seed, targets=plan.targets, cache_uri=uri, rank=plan.rank
    )
    with CacheWriter(uri, plan.cache_id, plan.rank_order) as cache:
        for task in plan.tasks:
            cache.record(worker.run(task))
        cache.commit(
            targets=plan.targets,
            teacher=plan.teacher,
            tokenizer=plan.tokenizer,
            dataset=plan.dataset,
            order=[t.name for t in plan.tasks],
        )
    return uri, plan, tok, worker


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory):
    return build_cache(tmp_path_factory.mktemp("cache"))


@pytest.mark.parametrize(
    "targets",
    [
        {"kind": "topk", "k": 6, "temperature": 2.0},
        {"kind": "full", "temperature": 1.0},
        {"kind": "sampled", "num_samples": 20, "temperature": 1.0, "store_logprobs": True},
    ],
)
def test_every_kind_reconstructs_the_teacher(tmp_path, targets):
    uri, plan, _, worker = build_cache(tmp_path, **{"cache.targets": targets, "corpus.max_tokens": 2048})
    m = open_manifest(uri)
    assert m.targets.kind == targets["kind"] and problems(uri)[1] == []
    table = read_split(uri, m, "train", max_rows=2)
    t = batch_targets(table, m, load_rank_order(uri, m))
    logp = torch.log_softmax(worker.logits({"input_ids": batch_input_ids(table)}) / targets["temperature"], dim=-1)
    if targets["kind"] == "full":
        torch.testing.assert_close(t.logprobs, logp)
        # a full cache holds the whole distribution: any temperature is exact
        hot = batch_targets(table, m, load_rank_order(uri, m), temperature=3.0)
        torch.testing.assert_close(
            hot.logprobs, torch.log_softmax(worker.logits({"input_ids": batch_input_ids(table)}) / 3.0, dim=-1)
        )
    elif targets["kind"] == "topk":
        torch.testing.assert_close(t.probs, logp.exp().gather(-1, t.ids))
        top = logp.exp().topk(targets["k"], dim=-1).values
        torch.testing.assert_close(t.tail_mass, (1 - top.sum(-1)).clamp_min(0))
    else:
        stored = (
            table.column("target_logprobs").combine_chunks().flatten().to_numpy(zero_copy_only=False, writable=True)
        )
        mask = t.probs > 0
        # ids come back per position in the stored (rank) order, so are the log-probs
        torch.testing.assert_close(torch.from_numpy(stored), logp.gather(-1, t.ids)[mask])


def test_manifest_consistent_with_shards(tiny_cache):
    uri, plan, _, _ = tiny_cache
    m = open_manifest(uri)
    assert m.cache_id == plan.cache_id and len(m.cache_id) == 32
    assert [s.path for s in m.shards] == [t.name for t in plan.tasks]
    for s in m.shards:
        assert fs.size(fs.join(uri, s.path)) == s.bytes
        assert fs.sha256(fs.join(uri, s.path)) == s.sha256
    assert sum(s.rows for s in m.shards) == m.totals["rows"] == sum(m.dataset.rows.values())
    assert m.totals["tokens"] == m.totals["rows"] * m.dataset.seq_len
    assert problems(uri)[1] == []
    assert set(finished_shards(uri)) == {s.path for s in m.shards}


def test_targets_round_trip_through_parquet(tiny_cache):
    uri, plan, _, worker = tiny_cache
    m = open_manifest(uri)
    table = read_split(uri, m, "train", max_rows=3)
    ids = batch_input_ids(table)
    assert ids.shape == (3, m.dataset.seq_len)
    np.testing.assert_array_equal(ids.numpy(), plan.tasks[0].input_ids[:3])
    t = batch_targets(table, m, load_rank_order(uri, m))
    assert isinstance(t, SparseTargets)
    torch.testing.assert_close(t.probs.sum(-1), torch.ones(3, m.dataset.seq_len))
    # The stored ids are draws from the teacher: recompute one row's targets and compare
    # position by position (the cache orders ids by rank, extraction by id).
    logits = worker.logits({"input_ids": ids[:1]})[0]
    again = targets.sampled(logits, 1.0, 50, targets.row_generator(0, table.column("seq_id")[0].as_py()))
    starts = np.concatenate([[0], np.cumsum(again["target_lengths"].astype(int))])
    for pos in range(m.dataset.seq_len):
        stored = {int(i): float(p) for i, p in zip(t.ids[0, pos], t.probs[0, pos]) if p > 0}
        seg = slice(starts[pos], starts[pos + 1])
        fresh = {int(i): c / 50 for i, c in zip(again["target_ids"][seg], again["target_counts"][seg])}
        assert stored == pytest.approx(fresh)


def test_rewritten_shard_is_byte_identical(tiny_cache, tmp_path):
    uri, plan, _, worker = tiny_cache
    m = open_manifest(uri)
    worker.cache_uri = str(tmp_path)
    rec = worker.run(plan.tasks[1])
    worker.cache_uri = uri
    assert rec.sha256 == m.shards[1].sha256


def test_reader_refusals(tiny_cache, tmp_path):
    uri, _, _, _ = tiny_cache
    m = open_manifest(uri)
    with pytest.raises(CacheFormatError, match="incomplete cache"):
        open_manifest(str(tmp_path))
    bad = tmp_path / "v3"
    bad.mkdir()
    raw = json.loads(fs.read_text(fs.join(uri, MANIFEST)))
    raw["format_version"] = 3
    (bad / MANIFEST).write_text(json.dumps(raw))
    with pytest.raises(CacheFormatError, match=r"format_version 3 is not supported by this kdscale \(reads 1, 2\)"):
        open_manifest(str(bad))
    with pytest.raises(CacheFormatError) as info:
        check_tokenizer(m, "f" * 64, m.tokenizer.vocab_size)
    assert m.tokenizer.fingerprint in str(info.value) and "f" * 64 in str(info.value)


def test_verify_names_a_flipped_byte(tiny_cache, tmp_path):
    import shutil

    uri, _, _, _ = tiny_cache
    copy = tmp_path / "copy"
    shutil.copytree(uri, copy)
    m = open_manifest(str(copy))
    victim = copy / m.shards[1].path
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    found = problems(str(copy))[1]
    assert len(found) == 1 and m.shards[1].path in found[0] and "sha256" in found[0]
    with pytest.raises(OSError):  # Parquet page CRCs catch it while reading, too
        read_split(str(copy), m, "train")


def test_unfinished_cache_for_another_job_is_refused(tmp_path):
    start_or_check_plan(str(tmp_path), "a" * 32)
    start_or_check_plan(str(tmp_path), "a" * 32)
    with pytest.raises(CacheFormatError, match="unfinished cache for another job"):
        start_or_check_plan(str(tmp_path), "b" * 32)


def test_padded_teacher_vocab_is_sliced_to_the_tokenizer(tmp_path):
    """A teacher whose LM head is wider than its tokenizer (e.g. 152,064 vs 151,936 in Qwen):
    the cache records both sizes and never stores an id past the true vocabulary."""
    uri, plan, tok, worker = build_cache(
        tmp_path,
        **{
            "teacher.architecture.vocab_size": 520,
            "corpus.max_tokens": 2048,
            "cache.targets": {"kind": "topk", "k": 8},
        },
    )
    m = open_manifest(uri)
    assert (m.tokenizer.vocab_size, m.tokenizer.logit_width) == (len(tok), 520) == (512, 520)
    assert worker.model.config.vocab_size == 520
    table = read_split(uri, m, "train")
    t = batch_targets(table, m, load_rank_order(uri, m))
    assert int(t.ids.max()) < 512
    # With the padding columns sliced off, the top-k mass is that of a 512-way softmax.
    logits = worker.model(input_ids=batch_input_ids(table)[:1]).logits.detach()
    p512 = torch.softmax(logits[..., :512], -1)
    torch.testing.assert_close(t.probs[:1], p512.gather(-1, t.ids[:1]))


def test_loss_temperature_must_match_sparse_caches_only(tiny_cache, tmp_path):
    from kdscale.student.trainer import cache_problems

    uri, _, _, _ = tiny_cache
    m = open_manifest(uri)
    spec = load_job(write_job(tmp_path, **{"students.0.loss.temperature": 2.0}))
    found = cache_problems(
        spec, 0, m.targets, m.dataset.rows["train"]
    )  # sampled at T=1: the draws cannot be re-tempered
    assert [f for f, _ in found] == ["students.0.loss.temperature"] and "cannot be re-tempered" in found[0][1]
    full = m.model_copy(update={"targets": m.targets.model_copy(update={"kind": "full"})})
    assert cache_problems(spec, 0, full.targets, full.dataset.rows["train"]) == []


def test_every_registered_kind_is_in_the_schemas_and_back():
    """The YAML and manifest schemas name exactly the registered kinds (kdscale.cache.kinds)."""
    import typing

    from kdscale.cache.format import TargetsInfo
    from kdscale.cache.kinds import KINDS
    from kdscale.config import TargetsSpec

    for model in (TargetsSpec, TargetsInfo):
        assert set(typing.get_args(model.model_fields["kind"].annotation)) == set(KINDS)


def test_cache_writer_commits_last_and_an_interrupted_write_resumes(tmp_path):
    """The writer refuses to commit over unrecorded shards; leaving it on an exception writes no
    manifest, releases the lease and keeps the ledger, so the next writer skips finished shards."""
    from kdscale.cache.format import LEDGER_DIR
    from kdscale.cache.writer import LEASE

    spec = load_job(write_job(tmp_path, **{"cache.rows_per_shard": 40}))
    tok = load_tokenizer(spec.teacher)
    plan = build_plan(spec, tok, pack_corpus(spec.corpus, tok))  # rows packed here: no Ray
    uri = str(tmp_path / "cache")
    worker = TeacherWorker(
        spec.teacher, vocab_size=len(tok), seed=spec.seed, targets=plan.targets, cache_uri=uri, rank=plan.rank
    )
    info = {"targets": plan.targets, "teacher": plan.teacher, "tokenizer": plan.tokenizer, "dataset": plan.dataset}
    names = [t.name for t in plan.tasks]
    assert len(names) >= 2
    with pytest.raises(KeyboardInterrupt), CacheWriter(uri, plan.cache_id, plan.rank_order) as cache:
        cache.record(worker.run(plan.tasks[0]))
        with pytest.raises(RuntimeError, match=f"shard\\(s\\) not recorded: {names[1]}"):
            cache.commit(**info, order=names)
        raise KeyboardInterrupt
    assert not fs.exists(fs.join(uri, MANIFEST))
    assert not fs.exists(fs.join(uri, LEDGER_DIR, LEASE))
    with CacheWriter(uri, plan.cache_id, plan.rank_order) as cache:
        assert set(cache.finished) == {names[0]}
        for task in plan.tasks[1:]:
            cache.record(worker.run(task))
        manifest, stale = cache.commit(**info, order=names)
    assert stale == 0 and [s.path for s in manifest.shards] == names
    assert open_manifest(uri).cache_id == plan.cache_id


V1_CACHE = Path(__file__).parent / "fixtures" / "cache_v1"


def test_a_v1_cache_written_by_the_previous_code_still_opens_verifies_and_decodes():
    """tests/fixtures/cache_v1: written by kdscale before input units (format 1, the cache_id over
    the content hash); every check passes and its rows decode to valid targets."""
    from kdscale.cache.store import LogitCache

    cache = LogitCache.open(str(V1_CACHE), checksums=True)
    assert cache.manifest.format_version == 1 and cache.cache_id == "165491d778a8b17aef0510ea33addd0b"
    assert cache.manifest.dataset.units is None and cache.splits == {"train": 27, "heldout": 5}
    ids, targets = next(cache.batches("train", batch_size=2))
    assert ids.shape == (2, 64) and int(targets.ids.max()) < cache.manifest.tokenizer.vocab_size


def test_a_unit_that_reads_differently_on_resume_is_refused(tmp_path):
    """The unit ledger: a rerun that re-reads a unit and gets other rows (a file edited with its
    size and time kept) is refused naming the file; the first record stays."""
    from kdscale.cache.format import UnitRecord

    def unit(content_hash: str) -> UnitRecord:
        piece = {
            "uri": "/data/a.jsonl",
            "fmt": "jsonl",
            "start": 0,
            "end": 10,
            "size": 10,
            "version": "1",
            "nbytes": 10,
        }
        return UnitRecord(
            index=0,
            pieces=[piece],
            content_hash=content_hash,
            documents=1,
            tokens=64,
            dropped_tokens=3,
            rows={"train": 1},
            shards=["train-00000.parquet"],
        )

    uri = str(tmp_path / "cache")
    order = np.arange(300, dtype=np.int32)
    with CacheWriter(uri, "c" * 32, order) as cache:
        cache.record_unit(unit("a" * 64))
        cache.record_unit(unit("a" * 64))  # the same rows again: fine
    with CacheWriter(uri, "c" * 32, order) as cache:
        assert cache.units[0].content_hash == "a" * 64
        with pytest.raises(CacheFormatError, match=r"input unit 0 \(/data/a.jsonl\) no longer holds the rows"):
            cache.record_unit(unit("b" * 64))
