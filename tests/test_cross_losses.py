"""Cross-tokenizer losses: chunked sparse paths equal plain dense/per-row references, values and gradients."""

from __future__ import annotations

from functools import partial

import pytest
import torch
import torch.nn.functional as F

from kdscale.models.task import IGNORE
from kdscale.student.cross_losses import CROSS_METHODS, VocabMap, cross_tokenizer_loss
from kdscale.student.losses import Divergence, distillation_loss
from kdscale.targets import SparseTargets

B, P, VT, VS = 2, 5, 11, 8
ALIGNED = torch.tensor([[1, 0, 1, 1, 0], [0, 1, 1, 0, 1]], dtype=torch.bool)
N = int(ALIGNED.sum())
PAIRS = ([0, 2, 3, 5, 9], [4, 0, 6, 1, 3])  # teacher id -> student id, 5 of 11 / 5 of 8 matched
MAP = VocabMap.from_pairs(*PAIRS, teacher_vocab=VT, student_vocab=VS)
SETTINGS = [(0.5, 1.0), (0.8, 2.0), (1.0, 0.7)]  # (alpha, T)

close = partial(torch.testing.assert_close, atol=1e-5, rtol=1e-5)


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, P, VS, generator=g) * 2
    teacher = torch.softmax(torch.randn(N, VT, generator=g) * 3, dim=-1)
    labels = torch.randint(0, VS, (B, P), generator=g)
    labels[0, 4] = labels[1, 0] = IGNORE
    return logits, teacher, labels


def _full(teacher: torch.Tensor, pad: int = 2) -> SparseTargets:
    """Every teacher id, shuffled, plus zero-probability padding."""
    n, v = teacher.shape
    perm = torch.randperm(v, generator=torch.Generator().manual_seed(3))
    ids = torch.cat([perm.expand(n, v), torch.zeros(n, pad, dtype=torch.long)], dim=-1)
    return SparseTargets(ids, torch.cat([teacher[:, perm], torch.zeros(n, pad)], dim=-1))


def _topk(teacher: torch.Tensor, k: int = 4, tail: str = "stored", pad: int = 1) -> SparseTargets:
    """Top-k with padding; tail 'stored' (1 - sum), 'none' (probs renormalized), 'odd' (a tail != 1 - sum)."""
    p, i = teacher.topk(k, dim=-1)
    rest = 1 - p.sum(-1)
    if tail == "none":
        p = p / p.sum(-1, keepdim=True)
    pad_ids = torch.randint(0, teacher.shape[-1], (teacher.shape[0], pad), generator=torch.Generator().manual_seed(4))
    ids, probs = torch.cat([i, pad_ids], -1), torch.cat([p, torch.zeros(teacher.shape[0], pad)], -1)
    return SparseTargets(ids, probs, {"stored": rest, "none": None, "odd": 0.5 * rest}[tail])


def _student_q(x: torch.Tensor, T: float) -> torch.Tensor:
    return torch.softmax(x.float() / T, dim=-1)[ALIGNED]


def _ce(x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(x.float().reshape(-1, VS), labels.reshape(-1), ignore_index=IGNORE)


def _dense_uld(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Per row: L1 between both full distributions sorted decreasingly, the shorter padded with zeros."""
    width = max(p.shape[-1], q.shape[-1])
    ps = F.pad(p, (0, width - p.shape[-1])).sort(-1, descending=True).values
    qs = F.pad(q, (0, width - q.shape[-1])).sort(-1, descending=True).values
    return (ps - qs).abs().sum(-1)


def _dense_hybrid(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Per row: KL over (matched ids + rest) + sorted L1 of the unmatched probs on each side."""
    t, s = torch.tensor(PAIRS[0]), torch.tensor(PAIRS[1])
    pm, qm = p[:, t], q[:, s]
    pr, qr = 1 - pm.sum(-1), 1 - qm.sum(-1)
    kl = (pm * (pm / qm).log()).sum(-1) + pr * (pr / qr).log()
    free_t = [i for i in range(VT) if i not in PAIRS[0]]
    free_s = [i for i in range(VS) if i not in PAIRS[1]]
    return kl + _dense_uld(p[:, free_t], q[:, free_s])


def _row_reference(targets: SparseTargets, q: torch.Tensor, pairs=None) -> torch.Tensor:
    """Per aligned position, written out: KL over matched buckets + ULD of the rest (pairs None: ULD)."""
    t2s = dict(zip(*pairs)) if pairs else {}
    free = [s for s in range(VS) if s not in t2s.values()]
    out = []
    for r in range(targets.ids.shape[0]):
        stored = [(int(i), p) for i, p in zip(targets.ids[r], targets.probs[r]) if p > 0]
        matched = [(t2s[i], p) for i, p in stored if i in t2s]
        unmatched = [p for i, p in stored if i not in t2s]
        d = torch.zeros(())
        if matched:
            pm, qm = torch.stack([p for _, p in matched]), q[r, [s for s, _ in matched]]
            pr, qr = 1 - pm.sum(), 1 - qm.sum()
            d = d + (pm * (pm / qm).log()).sum() + pr * (pr / qr).log()
        k = len(unmatched)
        pu = torch.stack(unmatched).sort(descending=True).values if unmatched else torch.zeros(0)
        qs = q[r, free].sort(descending=True).values[:k]
        qs = F.pad(qs, (0, k - qs.numel()))
        tail = targets.tail_mass
        p_other = tail[r] if tail is not None else (1 - targets.probs[r].sum()).clamp_min(0)
        d = d + (pu - qs).abs().sum() + (p_other - (q[r, free].sum() - qs.sum())).abs()
        out.append(d)
    return torch.stack(out)


def _value_and_grad(fn, logits: torch.Tensor):
    x = logits.clone().requires_grad_(True)
    parts = fn(x)
    (g,) = torch.autograd.grad(parts.total, x)
    return parts, g


def _reference(kd_rows_of, logits, labels, alpha, T):
    """(total, kd, ce, grad) of the plain reference: kd_rows_of(q) gives each aligned row's distance."""
    x = logits.clone().requires_grad_(True)
    kd = kd_rows_of(_student_q(x, T)).mean()
    ce = _ce(x, labels)
    total = alpha * T**2 * kd + (1 - alpha) * ce
    (g,) = torch.autograd.grad(total, x)
    return total, kd, ce, g


def _assert_matches(parts, grad, reference):
    total, kd, ce, g = reference
    close(parts.kd, kd)
    close(parts.ce, ce)
    close(parts.total, total)
    close(grad, g)
    assert torch.isfinite(grad).all()


@pytest.mark.parametrize("alpha,T", SETTINGS)
@pytest.mark.parametrize("chunk", [1, 3, 1024])
def test_uld_full_support_equals_dense_sorted_l1(alpha, T, chunk):
    logits, teacher, labels = _inputs()
    parts, grad = _value_and_grad(
        lambda x: cross_tokenizer_loss(
            x, labels, _full(teacher), ALIGNED, alpha=alpha, temperature=T, method="uld", chunk_positions=chunk
        ),
        logits,
    )
    _assert_matches(parts, grad, _reference(lambda q: _dense_uld(teacher, q), logits, labels, alpha, T))


@pytest.mark.parametrize("alpha,T", SETTINGS)
@pytest.mark.parametrize("chunk", [1, 3, 1024])
def test_hybrid_full_support_equals_dense_reference(alpha, T, chunk):
    logits, teacher, labels = _inputs(1)
    parts, grad = _value_and_grad(
        lambda x: cross_tokenizer_loss(
            x, labels, _full(teacher), ALIGNED, alpha=alpha, temperature=T, vocab_map=MAP, chunk_positions=chunk
        ),
        logits,
    )
    _assert_matches(parts, grad, _reference(lambda q: _dense_hybrid(teacher, q), logits, labels, alpha, T))


@pytest.mark.parametrize("method", CROSS_METHODS)
@pytest.mark.parametrize("tail", ["stored", "none", "odd"])
@pytest.mark.parametrize("alpha,T", SETTINGS[:2])
def test_topk_matches_row_reference(method, tail, alpha, T):
    logits, teacher, labels = _inputs(2)
    targets = _topk(teacher, tail=tail)
    parts, grad = _value_and_grad(
        lambda x: cross_tokenizer_loss(
            x, labels, targets, ALIGNED, alpha=alpha, temperature=T, method=method, vocab_map=MAP, chunk_positions=3
        ),
        logits,
    )
    pairs = PAIRS if method == "hybrid" else None
    _assert_matches(parts, grad, _reference(lambda q: _row_reference(targets, q, pairs), logits, labels, alpha, T))


@pytest.mark.parametrize("method", CROSS_METHODS)
def test_chunk_sizes_give_identical_results(method):
    logits, teacher, labels = _inputs(3)
    targets = _topk(teacher, k=5)
    runs = [
        _value_and_grad(
            lambda x, c=c: cross_tokenizer_loss(
                x, labels, targets, ALIGNED, alpha=0.6, temperature=1.5, method=method, vocab_map=MAP, chunk_positions=c
            ),
            logits,
        )
        for c in (1, 3, 1024)
    ]
    for parts, grad in runs[1:]:
        torch.testing.assert_close(parts.total, runs[0][0].total, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(grad, runs[0][1], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("method", CROSS_METHODS)
def test_padding_does_not_change_the_loss(method):
    logits, teacher, labels = _inputs(4)
    a, b = (
        _value_and_grad(
            lambda x, pad=pad: cross_tokenizer_loss(
                x, labels, _topk(teacher, pad=pad), ALIGNED, alpha=0.7, temperature=2.0, method=method, vocab_map=MAP
            ),
            logits,
        )
        for pad in (0, 6)
    )
    close(a[0].total, b[0].total)
    close(a[1], b[1])


def test_uld_is_hybrid_with_an_empty_map():
    logits, teacher, labels = _inputs(5)
    empty = VocabMap.from_pairs([], [], teacher_vocab=VT, student_vocab=VS)
    runs = [
        _value_and_grad(
            lambda x, m=m: cross_tokenizer_loss(
                x, labels, _topk(teacher), ALIGNED, alpha=0.5, temperature=2.0, method=m, vocab_map=empty
            ),
            logits,
        )
        for m in CROSS_METHODS
    ]
    close(runs[0][0].total, runs[1][0].total)
    close(runs[0][1], runs[1][1])


@pytest.mark.parametrize("method", CROSS_METHODS)
def test_no_aligned_positions_is_ce_only(method):
    logits, _, labels = _inputs(6)
    none = torch.zeros(B, P, dtype=torch.bool)
    empty = SparseTargets(torch.zeros(0, 4, dtype=torch.long), torch.zeros(0, 4), torch.zeros(0))
    parts, grad = _value_and_grad(
        lambda x: cross_tokenizer_loss(
            x, labels, empty, none, alpha=0.3, temperature=2.0, method=method, vocab_map=MAP, chunk_positions=3
        ),
        logits,
    )
    x = logits.clone().requires_grad_(True)
    ce = _ce(x, labels)
    (g,) = torch.autograd.grad(0.7 * ce, x)
    assert parts.kd.item() == 0.0
    close(parts.ce, ce)
    close(parts.total, 0.7 * ce)
    close(grad, g)
    with torch.no_grad():
        forward = cross_tokenizer_loss(
            logits, labels, empty, none, alpha=0.3, temperature=2.0, method=method, vocab_map=MAP
        )
    close(forward.total, parts.total.detach())


@pytest.mark.parametrize("method", CROSS_METHODS)
def test_all_positions_unlabelled(method):
    logits, teacher, _ = _inputs(7)
    labels = torch.full((B, P), IGNORE)
    targets = _topk(teacher)
    parts, grad = _value_and_grad(
        lambda x: cross_tokenizer_loss(
            x, labels, targets, ALIGNED, alpha=0.4, temperature=2.0, method=method, vocab_map=MAP
        ),
        logits,
    )
    assert parts.ce.item() == 0.0
    pairs = PAIRS if method == "hybrid" else None
    x = logits.clone().requires_grad_(True)
    kd = _row_reference(targets, _student_q(x, 2.0), pairs).mean()
    (g,) = torch.autograd.grad(0.4 * 4.0 * kd, x)
    close(parts.total, 0.4 * 4.0 * kd)
    close(grad, g)


def test_vocab_map_from_pairs_and_fractions():
    m = VocabMap.from_pairs(torch.tensor([1, 4, 7]), [2, 0, 5], teacher_vocab=10, student_vocab=6)
    assert m.teacher_to_student.tolist() == [-1, 2, -1, -1, 0, -1, -1, 5, -1, -1]
    assert m.student_matched().tolist() == [True, False, True, False, False, True]
    assert m.matched_fraction() == pytest.approx(0.3)
    assert MAP.matched_fraction() == pytest.approx(5 / 11)


@pytest.mark.parametrize(
    "teacher_ids,student_ids",
    [
        ([1, 1], [2, 3]),  # teacher id twice
        ([1, 2], [3, 3]),  # student id twice
        ([10], [0]),  # teacher id out of range
        ([-1], [0]),
        ([0], [6]),  # student id out of range
        ([0], [-2]),
        ([0, 1], [0]),  # lengths differ
    ],
)
def test_vocab_map_rejects_bad_pairs(teacher_ids, student_ids):
    with pytest.raises(ValueError):
        VocabMap.from_pairs(teacher_ids, student_ids, teacher_vocab=10, student_vocab=6)


def test_vocab_map_rejects_a_many_to_one_tensor():
    with pytest.raises(ValueError):
        VocabMap(torch.tensor([0, 0, -1]), student_vocab=3)


def _same_vocab_inputs(seed: int):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, P, VS, generator=g) * 2
    teacher = torch.softmax(torch.randn(B, P, VS, generator=g) * 3, dim=-1)
    labels = torch.randint(0, VS, (B, P), generator=g)
    labels[1, 2] = IGNORE
    return logits, teacher, labels


def _identity_vs_forward_kl(targets: SparseTargets, logits, labels):
    """(hybrid with an identity map, losses.py's forward KL) on the same targets, every position aligned."""
    k = targets.ids.shape[-1]
    flat = SparseTargets(
        targets.ids.reshape(-1, k),
        targets.probs.reshape(-1, k),
        None if targets.tail_mass is None else targets.tail_mass.reshape(-1),
    )
    identity = VocabMap.from_pairs(range(VS), range(VS), teacher_vocab=VS, student_vocab=VS)
    everywhere = torch.ones(B, P, dtype=torch.bool)
    kw = {"alpha": 0.6, "temperature": 2.0, "chunk_positions": 3}
    hybrid = _value_and_grad(
        lambda x: cross_tokenizer_loss(x, labels, flat, everywhere, vocab_map=identity, **kw), logits
    )
    fkl = _value_and_grad(
        lambda x: distillation_loss(x, labels, targets, divergence_spec=Divergence("forward_kl"), **kw), logits
    )
    return hybrid, fkl


def test_hybrid_identity_map_full_support_equals_forward_kl():
    logits, teacher, labels = _same_vocab_inputs(8)
    perm = torch.randperm(VS, generator=torch.Generator().manual_seed(9))
    targets = SparseTargets(
        torch.cat([perm.expand(B, P, VS), torch.zeros(B, P, 2, dtype=torch.long)], -1),
        torch.cat([teacher[..., perm], torch.zeros(B, P, 2)], -1),
    )
    (h, hg), (f, fg) = _identity_vs_forward_kl(targets, logits, labels)
    close(h.kd, f.kd)
    close(h.total, f.total)
    close(hg, fg)


def test_hybrid_identity_map_topk_is_forward_kl_plus_the_tail():
    # The student has no unmatched ids, so the ULD part is |tail - 0|: a constant, no gradient.
    logits, teacher, labels = _same_vocab_inputs(10)
    p, i = teacher.topk(3, dim=-1)
    tail = 1 - p.sum(-1)
    (h, hg), (f, fg) = _identity_vs_forward_kl(SparseTargets(i, p, tail), logits, labels)
    close(h.kd, f.kd + tail.mean())
    close(hg, fg)


@pytest.mark.parametrize("method", CROSS_METHODS)
def test_bf16_logits(method):
    logits, teacher, labels = _inputs(11)
    low = logits.bfloat16()
    targets = _topk(teacher)
    kw = {"alpha": 0.5, "temperature": 2.0, "method": method, "vocab_map": MAP}
    a, ga = _value_and_grad(lambda x: cross_tokenizer_loss(x, labels, targets, ALIGNED, **kw), low)
    b, gb = _value_and_grad(lambda x: cross_tokenizer_loss(x, labels, targets, ALIGNED, **kw), low.float())
    assert a.total.dtype == torch.float32 and ga.dtype == torch.bfloat16
    close(a.total, b.total)
    torch.testing.assert_close(ga.float(), gb, atol=1e-3, rtol=1e-2)


@pytest.mark.parametrize("method", CROSS_METHODS)
def test_peaked_logits_give_finite_gradients(method):
    logits, teacher, labels = _inputs(12)
    _, grad = _value_and_grad(
        lambda x: cross_tokenizer_loss(
            x * 60, labels, _topk(teacher, pad=3), ALIGNED, alpha=0.5, temperature=1.0, method=method, vocab_map=MAP
        ),
        logits,
    )
    assert torch.isfinite(grad).all()


@pytest.mark.parametrize("method", CROSS_METHODS)
def test_no_grad_path_equals_grad_path(method):
    logits, teacher, labels = _inputs(13)
    kw = {"alpha": 0.5, "temperature": 2.0, "method": method, "vocab_map": MAP, "chunk_positions": 3}
    with torch.no_grad():
        a = cross_tokenizer_loss(logits, labels, _topk(teacher), ALIGNED, **kw)
    b = cross_tokenizer_loss(logits.clone().requires_grad_(True), labels, _topk(teacher), ALIGNED, **kw)
    close(a.total, b.total.detach())
    close(a.kd, b.kd.detach())


def test_rejects_bad_arguments():
    logits, teacher, labels = _inputs(14)
    targets = _topk(teacher)
    with pytest.raises(ValueError, match="unknown method"):
        cross_tokenizer_loss(logits, labels, targets, ALIGNED, alpha=0.5, temperature=1.0, method="kl")
    with pytest.raises(ValueError, match="vocab_map"):
        cross_tokenizer_loss(logits, labels, targets, ALIGNED, alpha=0.5, temperature=1.0)
    other = VocabMap.from_pairs([0], [0], teacher_vocab=VT, student_vocab=VS + 1)
    with pytest.raises(ValueError, match="student vocabulary"):
        cross_tokenizer_loss(logits, labels, targets, ALIGNED, alpha=0.5, temperature=1.0, vocab_map=other)
    with pytest.raises(ValueError, match="target rows"):
        cross_tokenizer_loss(logits, labels, targets, ~ALIGNED, alpha=0.5, temperature=1.0, method="uld")


def test_golden_values():
    # Pinned: catches silent changes of definition (ordering of buckets, other-bucket mass, averaging).
    logits, teacher, labels = _inputs(42)
    targets = _topk(teacher, k=4)
    uld = cross_tokenizer_loss(logits, labels, targets, ALIGNED, alpha=0.5, temperature=2.0, method="uld")
    hybrid = cross_tokenizer_loss(logits, labels, targets, ALIGNED, alpha=0.5, temperature=2.0, vocab_map=MAP)
    got = [uld.kd.item(), hybrid.kd.item(), uld.ce.item(), hybrid.total.item()]
    assert got == pytest.approx([0.555951, 0.725605, 3.529034, 3.215726], abs=1e-5)
