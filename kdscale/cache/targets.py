"""Soft-target extraction from teacher logits: pure tensor functions, one row at a time.

``sampled`` (RS-KD, Anshumann et al. 2025): N draws with replacement from softmax(z/T); we keep
the unique ids and their counts, so counts/N is an unbiased estimate of the teacher's
distribution at ~12-16 ids per token instead of a biased top-k. Draws use a generator seeded
from (job seed, seq_id), so recomputing a row gives identical targets.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch


def row_generator(seed: int, sid: str) -> torch.Generator:
    value = int.from_bytes(hashlib.blake2b(f"{seed}:{sid}".encode(), digest_size=8).digest(), "little")
    return torch.Generator().manual_seed(value & ((1 << 63) - 1))


def sampled(
    logits: torch.Tensor, temperature: float, num_samples: int, generator: torch.Generator, store_logprobs: bool = False
) -> dict[str, np.ndarray]:
    """Unique sampled ids per position (ascending), their counts, and ids per position; with
    ``store_logprobs`` also the teacher's log-prob of each stored id.

    ``logits``: [positions, vocab] already sliced to the true vocabulary."""
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    probs = logp.exp()
    draws = torch.multinomial(probs, num_samples, replacement=True, generator=generator)
    draws, _ = draws.sort(dim=-1)
    first = torch.ones_like(draws, dtype=torch.bool)
    first[:, 1:] = draws[:, 1:] != draws[:, :-1]
    flat_first = first.reshape(-1)
    starts = flat_first.nonzero().squeeze(1)
    ends = torch.cat([starts[1:], torch.tensor([flat_first.numel()])])
    ids = draws.reshape(-1)[starts]
    lengths = first.sum(dim=-1)
    out = {
        "target_ids": ids.to(torch.int32).numpy(),
        "target_counts": (ends - starts).to(torch.uint8).numpy(),
        "target_lengths": lengths.to(torch.uint8).numpy(),
    }
    if store_logprobs:
        positions = torch.repeat_interleave(torch.arange(logits.shape[0]), lengths)
        out["target_logprobs"] = logp[positions, ids].numpy()
    return out


def topk(logits: torch.Tensor, temperature: float, k: int) -> dict[str, np.ndarray]:
    """The k most likely ids with their log-probs, and the tail mass they leave uncovered."""
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    values, ids = logp.topk(k, dim=-1)
    tail = (1.0 - values.exp().sum(dim=-1)).clamp_min(0.0)
    return {
        "target_ids": ids.to(torch.int32).reshape(-1).numpy(),
        "target_logprobs": values.reshape(-1).numpy(),
        "tail_mass": tail.numpy(),
    }


def full(logits: torch.Tensor, temperature: float) -> dict[str, np.ndarray]:
    return {"target_logprobs": torch.log_softmax(logits.float() / temperature, dim=-1).reshape(-1).numpy()}


def teacher_nll_and_top1(logits: torch.Tensor, input_ids: torch.Tensor) -> tuple[float, np.ndarray]:
    """Sum of next-token NLL at T=1 over the row's predicted positions, and the argmax per position."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    nll = -logp[:-1].gather(1, input_ids[1:].long().unsqueeze(1)).sum()
    return float(nll), logits.argmax(dim=-1).to(torch.int32).numpy()


def extract(
    kind: str,
    logits: torch.Tensor,
    *,
    temperature: float,
    num_samples: int,
    k: int,
    seed: int,
    sid: str,
    store_logprobs: bool = False,
) -> dict[str, np.ndarray]:
    if kind == "sampled":
        return sampled(logits, temperature, num_samples, row_generator(seed, sid), store_logprobs)
    if kind == "topk":
        return topk(logits, temperature, k)
    if kind == "full":
        return full(logits, temperature)
    raise ValueError(f"unknown target kind {kind!r}")
