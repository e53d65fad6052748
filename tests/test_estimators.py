"""The cache's target estimators beside plain sampling: stratified (exact head + weighted tail
draws) and several independent draws per position (a fresh draw each epoch). Each one that
claims to be unbiased is checked statistically, through the same writer coding and reader
decoding the loss sees."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kdscale.cache import targets
from kdscale.cache.format import DatasetInfo, Manifest, TargetsInfo
from kdscale.cache.reader import batch_targets, load_rank_order, open_manifest, read_split
from kdscale.cache.verify import problems
from kdscale.cache.writer import code_ids, rows_to_table
from kdscale.config import ConfigError, load_job
from kdscale.models.task import table_arrays
from tests.conftest import write_job

VOCAB = 12


def _decoded(kind: str, logits: torch.Tensor, epochs=(0,), **params) -> list[torch.Tensor]:
    """Extract one row of targets, code and store it as the writer does, read it back as the
    loss does, and return the dense [positions, vocab] estimate for each epoch."""
    info = TargetsInfo(kind=kind, temperature=1.0, seed=0, **params)
    row = {"seq_id": "s", "input_ids": np.zeros(logits.shape[0], dtype=np.int32)}
    row.update(
        targets.extract_row(
            kind,
            logits,
            torch.zeros(logits.shape[0], dtype=torch.long),
            temperature=1.0,
            num_samples=params.get("num_samples", 0),
            k=params.get("k", 0),
            seed=0,
            sid="s",
            draws=params.get("draws", 1),
        )
    )
    order = np.arange(VOCAB, dtype=np.int32)
    table = rows_to_table([code_ids(row, kind, order)], kind, "train")
    dataset = DatasetInfo.model_construct(seq_len=logits.shape[0])
    manifest = Manifest.model_construct(targets=info, dataset=dataset)
    out = []
    for epoch in epochs:
        t = batch_targets(table, manifest, order, epoch)
        dense = torch.zeros(logits.shape[0], VOCAB)
        dense.scatter_add_(1, t.ids[0], t.probs[0])
        out.append(dense)
    return out


def _assert_unbiased(estimates: torch.Tensor, p: torch.Tensor) -> None:
    """Mean over independent positions within 5 standard errors of the true probabilities."""
    mean = estimates.mean(0)
    se = estimates.std(0) / estimates.shape[0] ** 0.5
    assert torch.all((mean - p).abs() <= 5 * se + 1e-6), (mean, p)


@pytest.fixture
def peaked():
    """One fixed distribution over 12 ids, repeated at 3,000 positions: each position is an
    independent draw from the same generator stream."""
    torch.manual_seed(0)
    row = torch.randn(VOCAB) * 1.5
    return row.expand(3000, VOCAB).contiguous(), torch.softmax(row, -1)


def test_stratified_is_unbiased_with_an_exact_head(peaked):
    logits, p = peaked
    (dense,) = _decoded("stratified", logits, k=3, num_samples=8)
    torch.testing.assert_close(dense.sum(-1), torch.ones(len(dense)))
    head = p.topk(3).indices
    # the head is exact at every position: no variance where most of the mass is
    torch.testing.assert_close(dense[:, head], p[head].expand(len(dense), 3))
    _assert_unbiased(dense, p)
    tail = torch.ones(VOCAB, dtype=torch.bool)
    tail[head] = False
    assert dense[:, tail].std(0).max() > 0  # the tail really is sampled


def test_stratified_has_lower_variance_than_sampling_at_equal_draws(peaked):
    logits, p = peaked
    (strat,) = _decoded("stratified", logits, k=3, num_samples=8)
    (plain,) = _decoded("sampled", logits, num_samples=11)  # 3 exact + 8 drawn vs 11 drawn
    _assert_unbiased(plain, p)
    assert ((strat - p) ** 2).sum(-1).mean() < 0.5 * ((plain - p) ** 2).sum(-1).mean()


def test_every_draw_is_unbiased_and_epochs_cycle_through_draws(peaked):
    logits, p = peaked
    e0, e1, e2, e3 = _decoded("sampled", logits, epochs=(0, 1, 2, 3), num_samples=10, draws=3)
    for dense in (e0, e1, e2):
        torch.testing.assert_close(dense.sum(-1), torch.ones(len(dense)))
        _assert_unbiased(dense, p)
    torch.testing.assert_close(e3, e0)  # epoch 3 reads draw 3 mod 3 = 0
    assert not torch.equal(e0, e1) and not torch.equal(e1, e2)


def test_one_draw_consumes_the_generator_as_before():
    """draws=1 must reproduce caches written before draws existed, byte for byte."""
    logits = torch.randn(40, VOCAB)
    gen = targets.row_generator(3, "x")
    expected = torch.multinomial(torch.softmax(logits[:16], -1), 50, replacement=True, generator=gen)
    out = targets.extract_row(
        "sampled", logits, torch.zeros(40, dtype=torch.long), temperature=1.0, num_samples=50, k=0, seed=3, sid="x"
    )
    first = np.unique(expected[0].numpy())
    np.testing.assert_array_equal(out["target_ids"][: len(first)], first)
    assert TargetsInfo(kind="sampled", temperature=1.0, num_samples=50, seed=0).params() == {
        "kind": "sampled",
        "temperature": 1.0,
        "num_samples": 50,
        "k": None,
        "store_logprobs": False,
        "seed": 0,
    }


@pytest.mark.parametrize(
    "spec",
    [
        {"kind": "stratified", "k": 4, "num_samples": 12, "temperature": 1.0},
        {"kind": "sampled", "num_samples": 16, "temperature": 1.0, "draws": 2},
    ],
)
def test_new_kinds_through_the_teacher_worker(tmp_path, spec):
    from tests.test_cache import build_cache

    uri, plan, _, worker = build_cache(tmp_path, **{"cache.targets": spec, "corpus.max_tokens": 2048})
    m = open_manifest(uri)
    assert m.targets.kind == spec["kind"] and problems(uri)[1] == []
    assert m.targets.draws == spec.get("draws", 1)
    table = read_split(uri, m, "train", max_rows=2)
    order = load_rank_order(uri, m)
    t = batch_targets(table, m, order)
    torch.testing.assert_close(t.probs.sum(-1), torch.ones(t.probs.shape[:2]))
    p = torch.softmax(worker.logits(table_arrays(table, ("input_ids",))), dim=-1)
    if spec["kind"] == "stratified":
        head = p.topk(spec["k"], dim=-1)
        stored = torch.zeros_like(p).scatter_add_(-1, t.ids, t.probs)
        torch.testing.assert_close(stored.gather(-1, head.indices), head.values)
        assert m.totals["mean_tail_mass"] == pytest.approx(float((1 - head.values.sum(-1)).mean()), rel=0.2)
        assert m.totals["mean_ids_per_position"] > spec["k"]
    else:
        again = batch_targets(table, m, order, epoch=1)
        assert not torch.equal(t.ids, again.ids)
        torch.testing.assert_close(batch_targets(table, m, order, epoch=2).ids, t.ids)


def test_bad_estimator_settings_are_refused(tmp_path):
    """Each kind's own rules (kdscale.cache.kinds), checked with the rest of the spec before any work."""
    from kdscale import pipeline

    topk = load_job(write_job(tmp_path, **{"cache.targets": {"kind": "topk", "k": 4, "draws": 2}}))
    with pytest.raises(ConfigError) as e:
        pipeline.prepare(topk, str(tmp_path / "work"))
    assert "cache.targets.draws" in str(e.value) and "sampled only" in str(e.value)

    spec = load_job(write_job(tmp_path, dest="strat.yaml", **{"cache.targets": {"kind": "stratified", "k": 512}}))
    with pytest.raises(ConfigError) as e:
        pipeline.prepare(spec, str(tmp_path / "work"))
    assert "cache.targets.k" in str(e.value) and "tail" in str(e.value)


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.parametrize(
    "spec", [{"kind": "stratified", "k": 4, "num_samples": 12}, {"kind": "sampled", "num_samples": 16, "draws": 2}]
)
def test_students_train_from_the_new_kinds_end_to_end(ray_session, tmp_path, mlflow_uri, spec):
    import json

    from typer.testing import CliRunner

    from kdscale.cli import app

    job = write_job(tmp_path, **{"cache.targets": spec, "corpus.max_tokens": 4096, "students.0.train.epochs": 2})
    result = CliRunner().invoke(app, ["run", str(job), "--workdir", str(tmp_path / "work")])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "work" / "summary.json").read_text())
    student = summary["students"]["tiny-student"]
    assert student["heldout_ce"] < student["heldout_ce_untrained"]
    info = CliRunner().invoke(app, ["cache", "inspect", summary["cache"]["uri"], "--json"])
    params = json.loads(info.output)["params"]
    assert {k: params[k] for k in spec if k != "kind"} == {k: v for k, v in spec.items() if k != "kind"}
