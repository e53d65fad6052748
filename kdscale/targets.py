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
