"""Distillation losses: pure functions of tensors (no Ray, no DeepSpeed, no I/O).

``loss = alpha * T^2 * D(teacher_T, student_T) + (1 - alpha) * CE(student, label)``

with the label the next token (causal LM) or the class (image classification),
and D one of forward KL, reverse KL, generalized JSD(beta), total variation, or skew KL.

Sparse targets (sampled / top-k) are compared as *bucket* distributions: one bucket per stored id
plus an "other" bucket holding what the ids do not cover — the teacher's tail mass (top-k; zero
for sampled targets, whose counts/N already sum to one) against the student's remaining mass.
The student's log-probs at the stored ids come from a log-softmax over the *full* vocabulary.
Dense targets use the whole vocabulary, which makes every divergence its textbook definition;
tests check that sparse targets covering every id reproduce the dense values and gradients.
Reverse KL puts the teacher in the denominator, so a zero teacher bucket is floored at 1e-8.

Memory: the loss is one autograd function that walks the positions in chunks and, for each
chunk, computes the loss *and its gradient* right away, writing the gradient into a single
[positions, vocab] buffer. Peak memory is the logits, that buffer and one chunk's temporaries —
below plain cross-entropy, which keeps a full log-softmax for its backward (see
benchmarks/loss_memory.py). Without gradients (evaluation) the same chunks run forward only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kdscale.models.task import IGNORE, next_token_labels
from kdscale.targets import DenseTargets, SparseTargets

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "tvd", "skew_kl")
_TINY = 1e-30
_FLOOR = 1e-8


@dataclass
class LossParts:
    total: torch.Tensor
    kd: torch.Tensor
    ce: torch.Tensor


@dataclass(frozen=True)
class Divergence:
    name: str = "forward_kl"
    beta: float = 0.5  # jsd: weight of the teacher in the mixture
    skew: float = 0.1  # skew_kl: weight of the teacher in the mixture the student is compared to


def _kl(p: torch.Tensor, log_p: torch.Tensor, log_r: torch.Tensor) -> torch.Tensor:
    """sum p * (log p - log r), with 0 log 0 = 0."""
    return torch.where(p > 0, p * (log_p - log_r), torch.zeros_like(p)).sum()


def divergence(d: Divergence, p, log_p, q, log_q) -> torch.Tensor:
    """Sum over rows of D(p, q) for distributions over the last dimension."""
    if d.name == "forward_kl":
        return _kl(p, log_p, log_q)
    if d.name == "reverse_kl":
        return _kl(q, log_q, torch.log(p.clamp_min(_FLOOR)))
    if d.name == "jsd":
        log_m = torch.log((d.beta * p + (1 - d.beta) * q).clamp_min(_TINY))
        return d.beta * _kl(p, log_p, log_m) + (1 - d.beta) * _kl(q, log_q, log_m)
    if d.name == "tvd":
        return 0.5 * (p - q).abs().sum()
    if d.name == "skew_kl":
        return _kl(p, log_p, torch.log((d.skew * p + (1 - d.skew) * q).clamp_min(_TINY)))
    raise ValueError(f"unknown divergence {d.name!r} (choose from {', '.join(DIVERGENCES)})")


def _sparse_buckets(logq_t, ids, probs, tail):
    """Teacher and student over (stored ids + one 'other' bucket)."""
    # Padding entries (prob 0) get q = 0 but keep a finite log q: an infinite one would turn the
    # masked-out branches of torch.where into NaN gradients.
    log_qk = logq_t.gather(-1, ids)
    qk = log_qk.exp() * (probs > 0)
    q_other = (1.0 - qk.sum(-1, keepdim=True)).clamp_min(0.0)
    p_other = tail.unsqueeze(-1) if tail is not None else (1.0 - probs.sum(-1, keepdim=True)).clamp_min(0.0)
    p = torch.cat([probs, p_other], dim=-1)
    q = torch.cat([qk, q_other], dim=-1)
    log_q = torch.cat([log_qk, torch.log(q_other.clamp_min(_TINY))], dim=-1)
    return p, torch.log(p.clamp_min(_TINY)), q, log_q


def _chunk_loss(logits, target, labels, temperature: float, div: Divergence):
    """(sum of D over the chunk's positions, sum of CE over its labelled positions)."""
    z = logits.float()
    logq_t = torch.log_softmax(z / temperature, dim=-1)
    if isinstance(target, tuple):
        p, log_p, q, log_q = _sparse_buckets(logq_t, *target)
    else:
        log_p = target
        p, q, log_q = log_p.exp(), logq_t.exp(), logq_t
    kd = divergence(div, p, log_p, q, log_q)
    logq_1 = logq_t if temperature == 1.0 else torch.log_softmax(z, dim=-1)
    ce = F.nll_loss(logq_1, labels, ignore_index=IGNORE, reduction="sum")
    return kd, ce


def _chunk_targets(targets, n: int, sl: slice, device):
    if isinstance(targets, SparseTargets):
        tail = None if targets.tail_mass is None else targets.tail_mass.reshape(n)[sl].to(device, torch.float32)
        return (
            targets.ids.reshape(n, -1)[sl].to(device),
            targets.probs.reshape(n, -1)[sl].to(device, torch.float32),
            tail,
        )
    return targets.logprobs.reshape(n, -1)[sl].to(device, torch.float32)


class _ChunkedDistillation(torch.autograd.Function):
    """Loss and gradient computed together, chunk by chunk, into one gradient buffer."""

    @staticmethod
    def forward(ctx, logits, targets, labels, alpha, temperature, div, chunk, n_labelled):
        n = logits.shape[0]
        kd_weight = alpha * temperature**2 / n
        ce_weight = (1.0 - alpha) / n_labelled
        grad = torch.empty_like(logits)
        kd_sum = torch.zeros((), dtype=torch.float32, device=logits.device)
        ce_sum = torch.zeros((), dtype=torch.float32, device=logits.device)
        for start in range(0, n, chunk):
            sl = slice(start, min(start + chunk, n))
            with torch.enable_grad():
                x = logits[sl].detach().requires_grad_(True)
                kd, ce = _chunk_loss(x, _chunk_targets(targets, n, sl, logits.device), labels[sl], temperature, div)
                (g,) = torch.autograd.grad(kd_weight * kd + ce_weight * ce, x)
            grad[sl] = g
            kd_sum += kd.detach()
            ce_sum += ce.detach()
        ctx.save_for_backward(grad)
        kd_mean, ce_mean = kd_sum / n, ce_sum / n_labelled
        return alpha * temperature**2 * kd_mean + (1.0 - alpha) * ce_mean, kd_mean, ce_mean

    @staticmethod
    def backward(ctx, grad_total, grad_kd, grad_ce):
        (grad,) = ctx.saved_tensors
        # Scale the buffer in place rather than allocating another [positions, vocab] tensor
        # (the graph is not meant to be walked twice).
        return grad.mul_(grad_total.to(grad.dtype)), None, None, None, None, None, None, None


def distillation_loss(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    targets: SparseTargets | DenseTargets,
    *,
    alpha: float,
    temperature: float,
    chunk_positions: int = 1024,
    divergence_spec: Divergence = Divergence(),
) -> LossParts:
    """KD is averaged over every position (each has teacher targets), CE over labelled ones.

    ``student_logits``: [B, P, V]; ``labels``: [B, P] hard labels, IGNORE where none (for a causal
    LM, :func:`next_token_labels` of the input ids). ``kd`` and ``ce`` in the result are for
    logging; gradients flow through ``total`` only."""
    b, length, vocab = student_logits.shape
    logits = student_logits.reshape(b * length, vocab)
    labels = labels.reshape(-1).to(logits.device)
    n, n_labelled = logits.shape[0], max(int((labels != IGNORE).sum()), 1)
    if torch.is_grad_enabled() and logits.requires_grad:
        total, kd, ce = _ChunkedDistillation.apply(
            logits, targets, labels, alpha, temperature, divergence_spec, chunk_positions, n_labelled
        )
        return LossParts(total=total, kd=kd, ce=ce)
    kd_sum = ce_sum = torch.zeros((), device=logits.device)
    for start in range(0, n, chunk_positions):
        sl = slice(start, min(start + chunk_positions, n))
        kd, ce = _chunk_loss(
            logits[sl], _chunk_targets(targets, n, sl, logits.device), labels[sl], temperature, divergence_spec
        )
        kd_sum, ce_sum = kd_sum + kd, ce_sum + ce
    kd_mean, ce_mean = kd_sum / n, ce_sum / n_labelled
    return LossParts(alpha * temperature**2 * kd_mean + (1.0 - alpha) * ce_mean, kd_mean, ce_mean)


def cross_entropy(student_logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Plain next-token CE (mean over labelled positions): the held-out metric and the baseline."""
    b, length, vocab = student_logits.shape
    return F.cross_entropy(
        student_logits.reshape(-1, vocab).float(), next_token_labels(input_ids).reshape(-1), ignore_index=IGNORE
    )


def row_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row (first dimension): summed cross-entropy over its labelled positions, and their count."""
    flat = labels.reshape(-1)
    nll = F.cross_entropy(logits.reshape(flat.numel(), -1).float(), flat, ignore_index=IGNORE, reduction="none")
    rows = labels.shape[0]
    return nll.reshape(rows, -1).sum(-1), (labels != IGNORE).reshape(rows, -1).sum(-1)


def nll_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, int]:
    """Summed cross-entropy over the labelled positions and their count: the held-out score,
    shared by the collective evaluation during training and the evaluation after it."""
    nll, count = row_nll(logits, labels)
    return float(nll.sum()), int(count.sum())
