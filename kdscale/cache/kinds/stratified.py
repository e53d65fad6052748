"""``stratified``: the k most likely ids with exact log-probs, plus N draws from the teacher's
distribution renormalised over the other ids, each weighted tail_mass / N — an unbiased estimate
of the whole distribution with no variance on the head, where most of the mass is."""

from __future__ import annotations

import numpy as np
import torch

from kdscale.cache import idcodec, segments
from kdscale.cache.kinds.base import TargetKind, host
from kdscale.cache.kinds.sampled import unique_counts
from kdscale.cache.kinds.topk import top_tensors
from kdscale.targets import SparseTargets


class Stratified(TargetKind):
    name = "stratified"
    uses_num_samples = True
    uses_k = True
    draws_seeded = True
    has_tail_mass = True

    def columns(self, store_logprobs):
        return ("target_ids", "target_logprobs", "tail_mass", "tail_ids", "tail_counts", "tail_lengths")

    def spec_problems(self, t, vocab_size):
        if t.k >= vocab_size:
            return [
                (
                    "cache.targets.k",
                    f"stratified needs a tail to sample: k={t.k} must be below the vocabulary {vocab_size}",
                )
            ]
        return []

    def extract(self, d, *, num_samples, k, generator, store_logprobs, draws):
        head_ids, head_logprobs, tail_mass = top_tensors(d, k)
        tail_weights = d.weights.clone()
        tail_weights.scatter_(1, head_ids, 0.0)
        empty = tail_weights.sum(dim=-1) <= 0  # all mass in the head (tiny vocabularies): nothing to draw
        tail_weights[empty] = 1.0
        samples = torch.multinomial(tail_weights, num_samples, replacement=True, generator=generator)
        ids, counts, lengths = unique_counts(samples)
        if bool(empty.any()):
            keep = ~torch.repeat_interleave(empty, lengths)
            ids, counts, lengths = ids[keep], counts[keep], lengths.masked_fill(empty, 0)
        return {
            "target_ids": host(head_ids.to(torch.int32).reshape(-1)),
            "target_logprobs": host(head_logprobs.reshape(-1)),
            "tail_mass": host(tail_mass),
            "tail_ids": host(ids.to(torch.int32)),
            "tail_counts": host(counts.to(torch.uint8)),
            "tail_lengths": host(lengths.to(torch.uint8)),
        }

    def code(self, row, positions, rank):
        k = len(row["target_ids"]) // positions
        coded = segments.code(row, "target_ids", np.full(positions, k), ("target_logprobs",), rank)
        coded.update(segments.code(row, "tail_ids", row["tail_lengths"], ("tail_counts",), rank))
        return coded

    def decode(self, batch, m, order, epoch, temperature):
        b, seq_len, k = batch.num_rows, m.dataset.seq_len, m.targets.k
        positions = b * seq_len
        head_len = np.full(positions, k, dtype=np.int64)
        tail_len = segments.flat(batch.column("tail_lengths")).astype(np.int64)
        tail_mass = segments.flat(batch.column("tail_mass")).astype(np.float32)
        at_head, at_tail, total = segments.merge_segments(head_len, tail_len)
        ids = np.empty(int(total.sum()), dtype=np.int64)
        probs = np.empty(int(total.sum()), dtype=np.float32)
        ids[at_head] = idcodec.decode(segments.flat(batch.column("target_ids")), head_len, order)
        probs[at_head] = np.exp(segments.flat(batch.column("target_logprobs")))
        ids[at_tail] = idcodec.decode(segments.flat(batch.column("tail_ids")), tail_len, order)
        probs[at_tail] = segments.flat(batch.column("tail_counts")).astype(np.float32) * np.repeat(
            tail_mass / m.targets.num_samples, tail_len
        )
        ids, probs = segments.pad_segments([ids, probs], total, [0, 0.0])
        return SparseTargets(  # head exact + weighted tail draws: an estimate of the whole distribution
            torch.from_numpy(ids.astype(np.int64)).view(b, seq_len, -1), torch.from_numpy(probs).view(b, seq_len, -1)
        )

    def ids_per_position(self, table, m, positions):
        return m.targets.k + segments.flat(table.column("tail_lengths")).astype(np.int64)

    def leaf_counts(self, t, positions, vocab_size):
        return {
            "target_ids": positions * t.k,
            "target_logprobs": positions * t.k,
            "tail_mass": positions,
            "tail_lengths": positions,
        }
