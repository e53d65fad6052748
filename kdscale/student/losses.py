"""Distillation losses: pure functions of tensors (no Ray, no DeepSpeed, no I/O).

``loss = alpha * T^2 * KD(student_T || teacher targets) + (1 - alpha) * CE(student, labels)``

Sparse targets (sampled / top-k) are scored by gathering the student's log-probs at the stored
ids after a log-softmax over the *full* vocabulary. The work is done in chunks of positions under
activation checkpointing, so the [positions, vocab] log-softmax of only one chunk is alive at a
time; ``chunk_positions >= positions`` gives the plain (unchunked) computation, and tests check
both agree with a dense reference.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from kdscale.cache.reader import DenseTargets, SparseTargets

IGNORE = -100
_EPS = 1e-12


@dataclass
class LossParts:
    total: torch.Tensor
    kd: torch.Tensor
    ce: torch.Tensor


def _xlogx(p: torch.Tensor) -> torch.Tensor:
    return torch.where(p > 0, p * torch.log(p.clamp_min(_EPS)), torch.zeros_like(p))


def _chunk_sparse(logits, ids, probs, tail, labels, temperature: float):
    """Sum over the chunk's positions of forward KL(p || q_T) and of CE at T=1."""
    logq_t = torch.log_softmax(logits.float() / temperature, dim=-1)
    gathered = logq_t.gather(-1, ids)
    kd = (_xlogx(probs) - probs * gathered).sum()
    if tail is not None:
        # The uncovered tail is one bucket: compare its mass to the student's mass outside the ids.
        covered = gathered.exp().masked_fill(probs <= 0, 0.0).sum(-1)
        student_tail = (1.0 - covered).clamp_min(_EPS)
        kd = kd + (_xlogx(tail) - tail * torch.log(student_tail)).sum()
    logq_1 = logq_t if temperature == 1.0 else torch.log_softmax(logits.float(), dim=-1)
    ce = F.nll_loss(logq_1, labels, ignore_index=IGNORE, reduction="sum")
    return kd, ce


def _chunk_dense(logits, teacher_logprobs, labels, temperature: float):
    logq_t = torch.log_softmax(logits.float() / temperature, dim=-1)
    p = teacher_logprobs.exp()
    kd = (p * (teacher_logprobs - logq_t)).sum()
    logq_1 = logq_t if temperature == 1.0 else torch.log_softmax(logits.float(), dim=-1)
    ce = F.nll_loss(logq_1, labels, ignore_index=IGNORE, reduction="sum")
    return kd, ce


def next_token_labels(input_ids: torch.Tensor) -> torch.Tensor:
    """Labels aligned with logits: position i predicts input_ids[i+1]; the last has no label."""
    labels = torch.full_like(input_ids, IGNORE)
    labels[:, :-1] = input_ids[:, 1:]
    return labels


def distillation_loss(
    student_logits: torch.Tensor,
    input_ids: torch.Tensor,
    targets: SparseTargets | DenseTargets,
    *,
    alpha: float,
    temperature: float,
    chunk_positions: int = 1024,
) -> LossParts:
    """KD is averaged over every position (each has teacher targets), CE over labelled ones."""
    b, length, vocab = student_logits.shape
    logits = student_logits.reshape(b * length, vocab)
    labels = next_token_labels(input_ids).reshape(-1).to(logits.device)
    n = logits.shape[0]
    kd_sum = logits.new_zeros((), dtype=torch.float32)
    ce_sum = logits.new_zeros((), dtype=torch.float32)
    use_ckpt = torch.is_grad_enabled() and logits.requires_grad and chunk_positions < n
    for start in range(0, n, chunk_positions):
        sl = slice(start, min(start + chunk_positions, n))
        if isinstance(targets, SparseTargets):
            args = (
                logits[sl],
                targets.ids.reshape(n, -1)[sl].to(logits.device),
                targets.probs.reshape(n, -1)[sl].to(logits.device, torch.float32),
                None if targets.tail_mass is None else targets.tail_mass.reshape(n)[sl].to(logits.device, torch.float32),
                labels[sl],
            )
            fn = _chunk_sparse
        else:
            args = (logits[sl], targets.logprobs.reshape(n, -1)[sl].to(logits.device, torch.float32), labels[sl])
            fn = _chunk_dense
        if use_ckpt:
            kd, ce = checkpoint(fn, *args, temperature, use_reentrant=False)
        else:
            kd, ce = fn(*args, temperature)
        kd_sum = kd_sum + kd
        ce_sum = ce_sum + ce
    kd_mean = kd_sum / n
    ce_mean = ce_sum / max(int((labels != IGNORE).sum()), 1)
    total = alpha * temperature**2 * kd_mean + (1.0 - alpha) * ce_mean
    return LossParts(total=total, kd=kd_mean, ce=ce_mean)


def cross_entropy(student_logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Plain next-token CE (mean over labelled positions): the held-out metric and the baseline."""
    b, length, vocab = student_logits.shape
    return F.cross_entropy(
        student_logits.reshape(-1, vocab).float(), next_token_labels(input_ids).reshape(-1), ignore_index=IGNORE
    )
