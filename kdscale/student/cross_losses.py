"""Cross-tokenizer distillation losses: teacher targets over one vocabulary, the student over another.

``loss = alpha * T^2 * mean_{aligned} D(teacher, student_T) + (1 - alpha) * mean_{labelled} CE(student, label)``

The teacher's cached sparse targets (:class:`~kdscale.targets.SparseTargets`) hold ids of the
*teacher's* vocabulary, so the KL of :mod:`kdscale.student.losses` — which needs the student's
probability *at the teacher's id* — is undefined. Two tokenizations of one text also cut it at
different places: only the student positions that end on the same text boundary as a teacher
position (``aligned``, one target row each) get a KD term; every labelled position gets CE.

``"uld"`` — the Universal Logit Distillation loss (Boizard et al. 2024): the L1 distance between
the teacher's and the student's probability vectors, each *sorted in decreasing order*. Sorting
forgets which token carries which mass, so the distance is invariant to any relabelling of either
vocabulary and is defined between vocabularies of different sizes (the shorter vector padded with
zeros); it matches the *shape* of the distributions (how peaked, how spread), not their tokens.
On sparse targets both sides become buckets: for one position with k stored ids of non-zero
probability (padding, prob 0, is not counted, so the value does not depend on padding)

    ULD = sum_{r<=k} |p_(r) - q_(r)| + |p_o - q_o|

with p_(r) the teacher's stored probs sorted, q_(r) the student's k largest probs sorted
(0 past the student's vocabulary), p_o the teacher's tail mass (``1 - sum p`` clamped >= 0 when
``tail_mass`` is None) and q_o the student's mass outside its k largest. When the stored ids cover
the whole teacher vocabulary, p_o = q_o = 0 and this is the dense sorted L1.

``"hybrid"`` (TRL's GOLD on top of ULD): where a teacher id and a student id decode to exactly the
same bytes (:class:`VocabMap`), token identity is known and a direct KL is the stronger signal;
only the rest falls back to ULD. For one position, with m = ``teacher_to_student``, stored pairs
(i_j, p_j), M = {j : p_j > 0, m(i_j) >= 0}, U = {j : p_j > 0, m(i_j) < 0} and S the student ids
no teacher id maps to (``~student_matched()``):

    KL  = sum_{j in M} p_j log(p_j / q_{m(i_j)}) + r_p log(r_p / r_q)
          r_p = max(0, 1 - sum_M p_j),  r_q = max(0, 1 - sum_M q_{m(i_j)})
    ULD = sum_{r<=|U|} |pU_(r) - qS_(r)| + |p_o - qS_o|
          pU_(r): the teacher's unmatched stored probs sorted; qS_(r): the |U| largest student
          probs over S sorted (0 past |S|); p_o as in "uld" (the teacher's unmatched remaining
          mass is only known as its tail); qS_o = max(0, sum_S q - sum_r qS_(r))
    D   = KL + ULD

The KL is the forward KL over the buckets of :mod:`kdscale.student.losses`'s sparse path with the
matched ids as the stored ids and "other" = everything else, and it is computed by the same code.
With an identity map over equal vocabularies S is empty, so D = that forward KL + |p_o| (a
constant: zero when the stored ids cover the vocabulary, the tail mass for top-k). With an empty
map D is exactly "uld". Both pick the student's top entries per row: the k largest of the teacher
side are compared with the k largest of the student side, so padding never pulls the student's
extra entries towards zero.

Measured (benchmarks/cross_tokenizer.py: SmolLM2 teacher, a student with its own 8k BPE, 260
steps, 3 seeds): hybrid beat the CE-only twin by 14-18% held-out bits/byte in every seed; ULD alone
by -0.1% to +1.5% (no gain) — the ranking carried by the exact-match KL is what teaches.

Memory: as in :mod:`kdscale.student.losses`, one autograd function walks the positions in
chunks and computes each chunk's loss *and its gradient* right away into one [positions, vocab]
gradient buffer (sort/topk differentiate through plain autograd inside a chunk); without
gradients the same chunks run forward only. Math is float32 whatever the logits' dtype.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kdscale.models.task import IGNORE
from kdscale.student.losses import LossParts, _kl, _sparse_buckets
from kdscale.targets import SparseTargets

CROSS_METHODS = ("uld", "hybrid")

_Rows = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]  # ids, probs, tail of some target rows


@dataclass(frozen=True)
class VocabMap:
    """Teacher ids whose decoded bytes equal a student id's exactly (one-to-one)."""

    teacher_to_student: torch.Tensor  # int64 [teacher_vocab], -1 where no match
    student_vocab: int

    def __post_init__(self) -> None:
        t2s = self.teacher_to_student
        if t2s.dim() != 1 or t2s.dtype != torch.int64:
            raise ValueError("teacher_to_student must be a 1-D int64 tensor")
        mapped = t2s[t2s >= 0]
        if bool((t2s < -1).any()) or bool((mapped >= self.student_vocab).any()):
            raise ValueError(f"student ids must lie in [0, {self.student_vocab}) (or -1 for no match)")
        if mapped.unique().numel() != mapped.numel():
            raise ValueError("a student id is mapped from two teacher ids")

    @classmethod
    def from_pairs(
        cls,
        teacher_ids: torch.Tensor | Sequence[int],
        student_ids: torch.Tensor | Sequence[int],
        teacher_vocab: int,
        student_vocab: int,
    ) -> VocabMap:
        """The map of matched (teacher id, student id) pairs; ValueError unless one-to-one and in range."""
        t = torch.as_tensor(teacher_ids, dtype=torch.int64).reshape(-1)
        s = torch.as_tensor(student_ids, dtype=torch.int64).reshape(-1)
        if t.numel() != s.numel():
            raise ValueError(f"{t.numel()} teacher ids but {s.numel()} student ids")
        _check_ids(t, teacher_vocab, "teacher")
        _check_ids(s, student_vocab, "student")
        t2s = torch.full((teacher_vocab,), -1, dtype=torch.int64)
        t2s[t] = s
        return cls(t2s, student_vocab)

    def student_matched(self) -> torch.Tensor:
        """bool [student_vocab]: the student ids some teacher id maps to."""
        t2s = self.teacher_to_student
        matched = torch.zeros(self.student_vocab, dtype=torch.bool, device=t2s.device)
        matched[t2s[t2s >= 0]] = True
        return matched

    def matched_fraction(self) -> float:
        """Matched teacher ids / teacher_vocab."""
        return float((self.teacher_to_student >= 0).sum()) / max(self.teacher_to_student.numel(), 1)


def _check_ids(ids: torch.Tensor, vocab: int, side: str) -> None:
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        raise ValueError(f"{side} ids must lie in [0, {vocab})")
    if ids.unique().numel() != ids.numel():
        raise ValueError(f"a {side} id appears twice")


@dataclass(frozen=True, eq=False)
class _Plan:
    """What every chunk needs besides its tensors."""

    alpha: float
    temperature: float
    method: str
    teacher_to_student: torch.Tensor | None  # int64 [teacher_vocab] on the logits' device
    student_unmatched: torch.Tensor | None  # float32 [student_vocab]: 1 where no teacher id maps
    chunks: tuple[tuple[slice, slice], ...]  # (positions, their target rows)
    n_aligned: int
    n_labelled: int

    @property
    def kd_weight(self) -> float:
        return self.alpha * self.temperature**2 / max(self.n_aligned, 1)

    @property
    def ce_weight(self) -> float:
        return (1.0 - self.alpha) / max(self.n_labelled, 1)


def _teacher_other(probs: torch.Tensor, tail: torch.Tensor | None) -> torch.Tensor:
    """The teacher's mass outside its stored ids: the tail, or what the stored probs leave."""
    return tail if tail is not None else (1.0 - probs.sum(-1)).clamp_min(0.0)


def _sorted_l1(p: torch.Tensor, p_other: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Sum over rows of ULD between p's non-zero entries and q's as many largest, plus 'other' buckets.

    ``p`` [R, K] (zeros are not entries), ``p_other`` [R]; ``q`` [R, V] the student's candidate
    probs (zero where excluded), whose mass outside its top entries is its 'other' bucket."""
    k = p.shape[-1]
    p_sorted = p.sort(dim=-1, descending=True).values
    top = q.topk(min(k, q.shape[-1]), dim=-1).values
    top = F.pad(top, (0, k - top.shape[-1]))
    keep = torch.arange(k, device=p.device) < (p > 0).sum(-1, keepdim=True)
    top = top * keep
    q_other = (q.sum(-1) - top.sum(-1)).clamp_min(0.0)
    return (p_sorted - top).abs().sum() + (p_other - q_other).abs().sum()


def _hybrid(
    logq: torch.Tensor, ids: torch.Tensor, probs: torch.Tensor, p_other: torch.Tensor, plan: _Plan
) -> torch.Tensor:
    """Forward KL over the matched ids' buckets + ULD of the unmatched mass (module docstring)."""
    s = plan.teacher_to_student[ids]
    matched = (s >= 0) & (probs > 0)
    p, log_p, _, log_q = _sparse_buckets(logq, s.clamp_min(0), probs.masked_fill(~matched, 0.0), None)
    uld = _sorted_l1(probs.masked_fill(matched, 0.0), p_other, logq.exp() * plan.student_unmatched)
    return _kl(p, log_p, log_q) + uld


def _kd(logq: torch.Tensor, rows: _Rows, plan: _Plan) -> torch.Tensor:
    """Sum of the per-position distance over aligned positions (``logq``: their log q_T)."""
    ids, probs, tail = rows
    p_other = _teacher_other(probs, tail)
    if plan.method == "uld":
        return _sorted_l1(probs, p_other, logq.exp())
    return _hybrid(logq, ids, probs, p_other, plan)


def _chunk_loss(
    logits: torch.Tensor, labels: torch.Tensor, pos: torch.Tensor, rows: _Rows, plan: _Plan
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of D over the chunk's aligned positions ``pos``, sum of CE over its labelled ones)."""
    z = logits.float()
    logq_t = torch.log_softmax(z / plan.temperature, dim=-1)
    kd = _kd(logq_t.index_select(0, pos), rows, plan) if pos.numel() else z.new_zeros(())
    logq_1 = logq_t if plan.temperature == 1.0 else torch.log_softmax(z, dim=-1)
    ce = F.nll_loss(logq_1, labels, ignore_index=IGNORE, reduction="sum")
    return kd, ce


def _target_rows(targets: SparseTargets, rows: slice, device: torch.device) -> _Rows:
    k = targets.ids.shape[-1]
    tail = targets.tail_mass
    return (
        targets.ids.reshape(-1, k)[rows].to(device),
        targets.probs.reshape(-1, k)[rows].to(device, torch.float32),
        None if tail is None else tail.reshape(-1)[rows].to(device, torch.float32),
    )


def _walk(
    logits: torch.Tensor,
    labels: torch.Tensor,
    aligned_idx: torch.Tensor,
    targets: SparseTargets,
    plan: _Plan,
    grad: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of D, sum of CE) over all chunks; with ``grad``, each chunk's gradient of the total goes there."""
    kd_sum = ce_sum = torch.zeros((), dtype=torch.float32, device=logits.device)
    for sl, rows in plan.chunks:
        args = (labels[sl], aligned_idx[rows] - sl.start, _target_rows(targets, rows, logits.device), plan)
        if grad is None:
            kd, ce = _chunk_loss(logits[sl], *args)
        else:
            with torch.enable_grad():
                x = logits[sl].detach().requires_grad_(True)
                kd, ce = _chunk_loss(x, *args)
                (g,) = torch.autograd.grad(plan.kd_weight * kd + plan.ce_weight * ce, x)
            grad[sl] = g
        kd_sum, ce_sum = kd_sum + kd.detach(), ce_sum + ce.detach()
    return kd_sum, ce_sum


def _combine(
    kd_sum: torch.Tensor, ce_sum: torch.Tensor, plan: _Plan
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    kd, ce = kd_sum / max(plan.n_aligned, 1), ce_sum / max(plan.n_labelled, 1)
    return plan.alpha * plan.temperature**2 * kd + (1.0 - plan.alpha) * ce, kd, ce


class _ChunkedCrossDistillation(torch.autograd.Function):
    """Loss and gradient computed together, chunk by chunk, into one gradient buffer."""

    @staticmethod
    def forward(ctx, logits, labels, aligned_idx, targets, plan):
        grad = torch.empty_like(logits)
        kd_sum, ce_sum = _walk(logits, labels, aligned_idx, targets, plan, grad)
        ctx.save_for_backward(grad)
        return _combine(kd_sum, ce_sum, plan)

    @staticmethod
    def backward(ctx, grad_total, grad_kd, grad_ce):
        (grad,) = ctx.saved_tensors
        # In place, as in losses.py: the graph is not meant to be walked twice.
        return grad.mul_(grad_total.to(grad.dtype)), None, None, None, None


def _plan(
    aligned_idx: torch.Tensor,
    n: int,
    n_labelled: int,
    alpha: float,
    temperature: float,
    method: str,
    vocab_map: VocabMap | None,
    vocab: int,
    chunk: int,
) -> _Plan:
    device = aligned_idx.device
    t2s = unmatched = None
    if method == "hybrid":
        if vocab_map is None:
            raise ValueError("method 'hybrid' needs a vocab_map")
        if vocab_map.student_vocab != vocab:
            raise ValueError(f"vocab_map is for a student vocabulary of {vocab_map.student_vocab}, logits have {vocab}")
        t2s = vocab_map.teacher_to_student.to(device)
        unmatched = (~vocab_map.student_matched()).to(device, torch.float32)
    starts = list(range(0, n, chunk))
    bounds = starts + [n]
    # Target rows before each boundary: one host sync for all chunks.
    offsets = torch.searchsorted(aligned_idx, torch.tensor(bounds, device=device)).tolist()
    chunks = tuple((slice(s, e), slice(r0, r1)) for s, e, r0, r1 in zip(starts, bounds[1:], offsets, offsets[1:]))
    return _Plan(alpha, temperature, method, t2s, unmatched, chunks, aligned_idx.numel(), n_labelled)


def cross_tokenizer_loss(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    targets: SparseTargets,
    aligned: torch.Tensor,
    *,
    alpha: float,
    temperature: float,
    method: str = "hybrid",
    vocab_map: VocabMap | None = None,
    chunk_positions: int = 1024,
) -> LossParts:
    """KD averaged over the aligned positions (0 when none), CE over the labelled ones (0 when none).

    ``student_logits``: [B, P, Vs]; ``labels``: [B, P] student next-token labels, IGNORE where none;
    ``targets``: ids/probs [N, K] over the teacher's vocabulary (tail_mass [N] or None), one row per
    True entry of ``aligned`` [B, P] in row-major order; ``vocab_map`` is required for "hybrid".
    Student probabilities for KD are softmax(logits / T); teacher targets are used as stored.
    ``kd`` and ``ce`` in the result are for logging; gradients flow through ``total`` only."""
    if method not in CROSS_METHODS:
        raise ValueError(f"unknown method {method!r} (choose from {', '.join(CROSS_METHODS)})")
    b, length, vocab = student_logits.shape
    if tuple(aligned.shape) != (b, length):
        raise ValueError(f"aligned is {tuple(aligned.shape)}, logits are {(b, length)} positions")
    logits = student_logits.reshape(b * length, vocab)
    labels = labels.reshape(-1).to(logits.device)
    aligned_idx = aligned.reshape(-1).to(logits.device, torch.bool).nonzero().squeeze(1)
    n_rows = targets.ids.reshape(-1, targets.ids.shape[-1]).shape[0]
    if n_rows != aligned_idx.numel():
        raise ValueError(f"{n_rows} target rows for {aligned_idx.numel()} aligned positions")
    n_labelled = int((labels != IGNORE).sum())
    plan = _plan(aligned_idx, b * length, n_labelled, alpha, temperature, method, vocab_map, vocab, chunk_positions)
    if torch.is_grad_enabled() and logits.requires_grad:
        total, kd, ce = _ChunkedCrossDistillation.apply(logits, labels, aligned_idx, targets, plan)
    else:
        kd_sum, ce_sum = _walk(logits, labels, aligned_idx, targets, plan)
        total, kd, ce = _combine(kd_sum, ce_sum, plan)
    return LossParts(total=total, kd=kd, ce=ce)
