"""``full``: dense log-probs at every position — only for small vocabularies (tests, image
classes); it alone can be re-tempered exactly to any loss temperature."""

from __future__ import annotations

import numpy as np
import torch

from kdscale.cache import segments
from kdscale.cache.kinds.base import TargetKind, host
from kdscale.targets import DenseTargets

MAX_FULL_VOCAB = 4096


class Full(TargetKind):
    name = "full"
    can_retemper = True

    def columns(self, store_logprobs):
        return ("target_logprobs",)

    def spec_problems(self, t, vocab_size):
        if vocab_size > MAX_FULL_VOCAB:
            return [
                (
                    "cache.targets.kind",
                    f"'full' stores every log-prob ({vocab_size} per token); use sampled or "
                    f"topk above {MAX_FULL_VOCAB}",
                )
            ]
        return []

    def extract(self, d, *, num_samples, k, generator, store_logprobs, draws):
        return {"target_logprobs": host(d.logprobs().reshape(-1))}

    def decode(self, batch, m, order, epoch, temperature):
        """Re-tempered exactly when asked: log p_T' = log_softmax(log p_T * T / T')."""
        b, seq_len, v = batch.num_rows, m.dataset.seq_len, m.tokenizer.vocab_size
        logprobs = torch.from_numpy(segments.flat(batch.column("target_logprobs")).reshape(b, seq_len, v))
        captured = m.targets.temperature
        if temperature is not None and abs(temperature - captured) > 1e-12:
            logprobs = torch.log_softmax(logprobs.double() * (captured / temperature), dim=-1).float()
        return DenseTargets(logprobs)

    def ids_per_position(self, table, m, positions):
        return np.full(positions, m.tokenizer.vocab_size, dtype=np.int64)

    def leaf_counts(self, t, positions, vocab_size):
        return {"target_logprobs": positions * vocab_size}
