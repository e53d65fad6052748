"""Losses: sparse and chunked paths equal the dense/plain references, values and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kdscale.cache.reader import DenseTargets, SparseTargets
from kdscale.student.losses import DIVERGENCES, Divergence, cross_entropy, distillation_loss, next_token_labels

B, L, V = 2, 5, 13


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, L, V, generator=g) * 2
    teacher = torch.log_softmax(torch.randn(B, L, V, generator=g) * 3, dim=-1)
    ids = torch.randint(0, V, (B, L), generator=g)
    return logits, teacher, ids


def _reference(logits, teacher_logprobs, ids, alpha, T):
    """Textbook KD: alpha*T^2*KL(p_T || q_T) averaged over positions + (1-alpha)*CE."""
    logq = torch.log_softmax(logits / T, dim=-1)
    kl = F.kl_div(logq.reshape(-1, V), teacher_logprobs.reshape(-1, V), log_target=True, reduction="sum") / (B * L)
    ce = F.cross_entropy(logits.reshape(-1, V), next_token_labels(ids).reshape(-1), ignore_index=-100)
    return alpha * T**2 * kl + (1 - alpha) * ce, kl, ce


def _grad(fn, logits):
    x = logits.clone().requires_grad_(True)
    parts = fn(x)
    parts.total.backward()
    return parts, x.grad


@pytest.mark.parametrize("T", [1.0, 2.0])
@pytest.mark.parametrize("chunk", [1, 3, 1000])
def test_dense_matches_reference(T, chunk):
    logits, teacher, ids = _inputs()
    parts, grad = _grad(
        lambda x: distillation_loss(
            x, next_token_labels(ids), DenseTargets(teacher), alpha=0.3, temperature=T, chunk_positions=chunk
        ),
        logits,
    )
    x = logits.clone().requires_grad_(True)
    total, kl, ce = _reference(x, teacher, ids, 0.3, T)
    total.backward()
    torch.testing.assert_close(parts.total, total)
    torch.testing.assert_close(parts.kd, kl)
    torch.testing.assert_close(parts.ce, ce)
    torch.testing.assert_close(grad, x.grad)


@pytest.mark.parametrize("chunk", [1, 4, 1000])
def test_sparse_over_full_support_equals_dense(chunk):
    logits, teacher, ids = _inputs(1)
    # Every id, shuffled, plus zero-probability padding: must equal the dense loss exactly.
    perm = torch.randperm(V, generator=torch.Generator().manual_seed(3))
    sparse_ids = torch.cat([perm.expand(B, L, V), torch.zeros(B, L, 3, dtype=torch.long)], dim=-1)
    probs = torch.cat([teacher.exp()[..., perm], torch.zeros(B, L, 3)], dim=-1)
    sparse = SparseTargets(sparse_ids, probs)
    p1, g1 = _grad(
        lambda x: distillation_loss(
            x, next_token_labels(ids), sparse, alpha=0.5, temperature=1.0, chunk_positions=chunk
        ),
        logits,
    )
    p2, g2 = _grad(
        lambda x: distillation_loss(
            x, next_token_labels(ids), DenseTargets(teacher), alpha=0.5, temperature=1.0, chunk_positions=1000
        ),
        logits,
    )
    torch.testing.assert_close(p1.total, p2.total)
    torch.testing.assert_close(g1, g2)


def test_topk_with_tail_equals_collapsed_dense_reference():
    logits, teacher, ids = _inputs(2)
    k = 4
    p = teacher.exp()
    top_p, top_i = p.topk(k, dim=-1)
    tail = 1 - top_p.sum(-1)
    targets = SparseTargets(top_i, top_p, tail)
    parts = distillation_loss(logits, next_token_labels(ids), targets, alpha=1.0, temperature=1.0, chunk_positions=3)
    # Reference: KL between the (k+1)-bucket distributions, computed position by position.
    q = torch.softmax(logits, dim=-1)
    total = 0.0
    for b in range(B):
        for t in range(L):
            qi = q[b, t, top_i[b, t]]
            pb = torch.cat([top_p[b, t], tail[b, t : t + 1]])
            qb = torch.cat([qi, (1 - qi.sum()).unsqueeze(0)])
            total += float((pb * (pb.log() - qb.log())).sum())
    assert parts.kd.item() == pytest.approx(total / (B * L), rel=1e-5)


def test_chunked_sparse_equals_unchunked_with_gradients():
    logits, _, ids = _inputs(4)
    g = torch.Generator().manual_seed(5)
    sparse = SparseTargets(torch.randint(0, V, (B, L, 6), generator=g), torch.rand(B, L, 6, generator=g) / 6)
    a, ga = _grad(
        lambda x: distillation_loss(x, next_token_labels(ids), sparse, alpha=0.7, temperature=2.0, chunk_positions=2),
        logits,
    )
    b, gb = _grad(
        lambda x: distillation_loss(
            x, next_token_labels(ids), sparse, alpha=0.7, temperature=2.0, chunk_positions=10_000
        ),
        logits,
    )
    torch.testing.assert_close(a.total, b.total)
    torch.testing.assert_close(ga, gb)


def test_alpha_zero_is_plain_cross_entropy():
    logits, teacher, ids = _inputs(6)
    parts = distillation_loss(logits, next_token_labels(ids), DenseTargets(teacher), alpha=0.0, temperature=1.0)
    torch.testing.assert_close(parts.total, cross_entropy(logits, ids))


def _reference_divergence(name, p, q, beta=0.5, skew=0.1):
    """Textbook definitions over the last dimension, summed over rows (independent code)."""

    def kl(a, b):
        return (a * (a.clamp_min(1e-30).log() - b.clamp_min(1e-30).log())).sum()

    if name == "forward_kl":
        return kl(p, q)
    if name == "reverse_kl":
        return kl(q, p)
    if name == "jsd":
        m = beta * p + (1 - beta) * q
        return beta * kl(p, m) + (1 - beta) * kl(q, m)
    if name == "tvd":
        return 0.5 * (p - q).abs().sum()
    if name == "skew_kl":
        return kl(p, skew * p + (1 - skew) * q)
    raise AssertionError(name)


@pytest.mark.parametrize("name", DIVERGENCES)
@pytest.mark.parametrize("T", [1.0, 2.0])
def test_every_divergence_dense_matches_textbook(name, T):
    logits, teacher, ids = _inputs(7)
    div = Divergence(name, beta=0.3, skew=0.2)
    parts, grad = _grad(
        lambda x: distillation_loss(
            x,
            next_token_labels(ids),
            DenseTargets(teacher),
            alpha=0.6,
            temperature=T,
            chunk_positions=3,
            divergence_spec=div,
        ),
        logits,
    )
    x = logits.clone().requires_grad_(True)
    q = torch.softmax(x / T, dim=-1)
    kd = _reference_divergence(name, teacher.exp(), q, beta=0.3, skew=0.2) / (B * L)
    ce = F.cross_entropy(x.reshape(-1, V), next_token_labels(ids).reshape(-1), ignore_index=-100)
    total = 0.6 * T**2 * kd + 0.4 * ce
    total.backward()
    torch.testing.assert_close(parts.kd, kd)
    torch.testing.assert_close(parts.total, total)
    torch.testing.assert_close(grad, x.grad)


@pytest.mark.parametrize("name", DIVERGENCES)
def test_every_divergence_sparse_full_support_equals_dense(name):
    logits, teacher, ids = _inputs(8)
    perm = torch.randperm(V, generator=torch.Generator().manual_seed(9))
    sparse = SparseTargets(
        torch.cat([perm.expand(B, L, V), torch.zeros(B, L, 2, dtype=torch.long)], -1),
        torch.cat([teacher.exp()[..., perm], torch.zeros(B, L, 2)], -1),
    )
    div = Divergence(name)
    a, ga = _grad(
        lambda x: distillation_loss(
            x, next_token_labels(ids), sparse, alpha=0.8, temperature=1.5, chunk_positions=4, divergence_spec=div
        ),
        logits,
    )
    b, gb = _grad(
        lambda x: distillation_loss(
            x,
            next_token_labels(ids),
            DenseTargets(teacher),
            alpha=0.8,
            temperature=1.5,
            chunk_positions=1000,
            divergence_spec=div,
        ),
        logits,
    )
    torch.testing.assert_close(a.total, b.total)
    torch.testing.assert_close(ga, gb)
    assert torch.isfinite(ga).all()


@pytest.mark.parametrize("name", DIVERGENCES)
def test_every_divergence_on_topk_buckets(name):
    logits, teacher, ids = _inputs(10)
    k = 3
    top_p, top_i = teacher.exp().topk(k, dim=-1)
    tail = 1 - top_p.sum(-1)
    parts = distillation_loss(
        logits,
        next_token_labels(ids),
        SparseTargets(top_i, top_p, tail),
        alpha=1.0,
        temperature=1.0,
        chunk_positions=2,
        divergence_spec=Divergence(name),
    )
    q = torch.softmax(logits, dim=-1)
    qk = q.gather(-1, top_i)
    pb = torch.cat([top_p, tail.unsqueeze(-1)], -1)
    qb = torch.cat([qk, 1 - qk.sum(-1, keepdim=True)], -1)
    assert parts.kd.item() == pytest.approx(_reference_divergence(name, pb, qb).item() / (B * L), rel=1e-4)


def test_no_grad_path_equals_grad_path():
    logits, teacher, ids = _inputs(11)
    with torch.no_grad():
        a = distillation_loss(
            logits, next_token_labels(ids), DenseTargets(teacher), alpha=0.5, temperature=2.0, chunk_positions=3
        )
    b = distillation_loss(
        logits.clone().requires_grad_(True), next_token_labels(ids), DenseTargets(teacher), alpha=0.5, temperature=2.0
    )
    torch.testing.assert_close(a.total, b.total.detach())
