"""The teacher's per-position distribution as the losses take it, whatever stored it (a cache's
target kind, or a teacher run online): neutral ground between kdscale.cache and kdscale.student."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SparseTargets:
    """Per-position sparse teacher distribution, padded to K ids (padding has prob 0).

    ``ids``/``probs``: [B, L, K]; ``tail_mass``: [B, L] probability not covered (top-k), or None
    when ``probs`` are an unbiased estimate of the whole distribution (sampled)."""

    ids: torch.Tensor
    probs: torch.Tensor
    tail_mass: torch.Tensor | None = None


@dataclass
class DenseTargets:
    logprobs: torch.Tensor  # [B, L, V]


@dataclass
class AlignedTargets:
    """Teacher targets for a student with its own tokenizer (kdscale.models.cross_task): one row
    of sparse targets per *aligned* student position, in row-major order of ``aligned`` — the
    student positions that end at the same text byte as a teacher position. Teacher ids stay in
    the teacher's vocabulary; the cross-tokenizer losses compare them without a shared one."""

    targets: SparseTargets  # ids / probs [N, K], tail_mass [N] or None
    aligned: torch.Tensor  # bool [B, S], N True entries
