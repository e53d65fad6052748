"""``topk``: the k most likely ids with their log-probs, and the tail mass they leave uncovered
(biased: the tail is known only as a total, which the losses account for)."""

from __future__ import annotations

import numpy as np
import torch

from kdscale.cache import idcodec, segments
from kdscale.cache.kinds.base import TargetKind, host
from kdscale.targets import SparseTargets


def top_tensors(d, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The k most likely ids [positions, k], their log-probs, and the tail mass, on the logits' device."""
    values, ids = d.scaled.topk(k, dim=-1)
    logprobs = values - d.log_z
    return ids, logprobs, (1.0 - logprobs.exp().sum(dim=-1)).clamp_min(0.0)


def top_ids(d, k: int) -> dict[str, np.ndarray]:
    ids, logprobs, tail = top_tensors(d, k)
    return {
        "target_ids": host(ids.to(torch.int32).reshape(-1)),
        "target_logprobs": host(logprobs.reshape(-1)),
        "tail_mass": host(tail),
    }


class TopK(TargetKind):
    name = "topk"
    uses_k = True
    has_tail_mass = True
    needs_full_logits = False  # top-k log-probs (normalised over the whole vocabulary) suffice

    def columns(self, store_logprobs):
        return ("target_ids", "target_logprobs", "tail_mass")

    def spec_problems(self, t, vocab_size):
        if t.k > vocab_size:
            return [("cache.targets.k", f"k={t.k} exceeds the vocabulary {vocab_size}")]
        return []

    def extract(self, d, *, num_samples, k, generator, store_logprobs, draws):
        return top_ids(d, k)

    def code(self, row, positions, rank):
        k = len(row["target_ids"]) // positions
        return segments.code(row, "target_ids", np.full(positions, k), ("target_logprobs",), rank)

    def decode(self, batch, m, order, epoch, temperature):
        b, seq_len, k = batch.num_rows, m.dataset.seq_len, m.targets.k
        lengths = np.full(b * seq_len, k, dtype=np.int64)
        ids = idcodec.decode(segments.flat(batch.column("target_ids")), lengths, order).reshape(b, seq_len, k)
        probs = np.exp(segments.flat(batch.column("target_logprobs"))).reshape(b, seq_len, k)
        tail = segments.flat(batch.column("tail_mass")).reshape(b, seq_len)
        return SparseTargets(torch.from_numpy(ids), torch.from_numpy(probs.astype(np.float32)), torch.from_numpy(tail))

    def ids_per_position(self, table, m, positions):
        return np.full(positions, m.targets.k, dtype=np.int64)

    def leaf_counts(self, t, positions, vocab_size):
        return {"target_ids": positions * t.k, "target_logprobs": positions * t.k, "tail_mass": positions}
