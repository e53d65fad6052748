"""Soft-target extraction from teacher logits: pure tensor functions, one row at a time.

``sampled`` (RS-KD, Anshumann et al. 2025): N draws with replacement from softmax(z/T); we keep
the unique ids and their counts, so counts/N is an unbiased estimate of the teacher's
distribution at ~12-16 ids per token instead of a biased top-k. Draws use a generator seeded
from (job seed, seq_id), so recomputing a row gives identical targets.

Extraction runs where the logits are (the teacher's device): only the sparse results reach the
host (:func:`kdscale.cache.kinds.base.host`), never the [positions, vocab] logits. On a CPU it
runs beside the teacher's forward on the same cores, so it touches the logits as few
times as possible — one max pass (values only; the argmax too for eval rows), one subtraction and one
exp pass at the capture temperature (a second exp only when T != 1, for the T=1 likelihood) — and
works on ``CHUNK`` positions at a time so the [chunk, vocab] temporaries stay in cache instead of
paging in fresh memory per op (vocab 49,152 on one core: 0.78 ms/token naive, ~0.25 ms chunked,
against ~5 ms for SmolLM2's forward). On a GPU the row is one chunk: there each chunk costs a
dozen kernel launches and ~6 host synchronizations (a 256-position row in 16-position chunks made
~100), and memory is no concern. The chunking is part of the sampling stream (draws are taken
chunk by chunk from one generator), so it is fixed per device type (:func:`chunk_positions`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch

from kdscale.cache.kinds.base import host


def row_generator(seed: int, sid: str, device: torch.device | str = "cpu") -> torch.Generator:
    """The row's draws' generator, on the device its logits are on (a CUDA generator draws a
    different stream than a CPU one from the same seed: caches made on a GPU are reproducible on
    GPUs, and CPU caches byte for byte on CPUs; the draws' distribution is the same)."""
    value = int.from_bytes(hashlib.blake2b(f"{seed}:{sid}".encode(), digest_size=8).digest(), "little")
    return torch.Generator(device=device).manual_seed(value & ((1 << 63) - 1))


@dataclass
class RowDistribution:
    """softmax(logits / T) of one row, kept in the cheapest form: ``scaled = (z - max z) / T``,
    unnormalised ``weights = exp(scaled)`` and ``log_z = log(sum(weights))``."""

    scaled: torch.Tensor
    weights: torch.Tensor
    log_z: torch.Tensor  # [positions, 1]
    shifted: torch.Tensor  # z - max z (T = 1)
    top1: torch.Tensor | None  # teacher argmax per position, when asked for

    @classmethod
    def of(
        cls, logits: torch.Tensor, temperature: float, with_top1: bool = False, scratch: Scratch | None = None
    ) -> RowDistribution:
        """``with_top1``: also the argmax. Only eval rows store it, and a max that also returns
        indices is not vectorised: on one core at vocab 49,152 it takes 0.035 ms/token against
        0.007 for ``amax``, the values alone (identical maxima, so identical targets).
        ``scratch``: buffers to compute into (see :class:`Scratch`); the result lives in them."""
        logits = logits.float()
        if with_top1:
            maxima, top1 = logits.max(dim=-1, keepdim=True)
        else:
            maxima, top1 = logits.amax(dim=-1, keepdim=True), None
        shifted, scaled, weights = (scratch or Scratch(logits, temperature)).views(logits.shape[0])
        torch.sub(logits, maxima, out=shifted)
        if scaled is not shifted:
            torch.div(shifted, temperature, out=scaled)
        torch.exp(scaled, out=weights)
        log_z = weights.sum(dim=-1, keepdim=True).log()
        return cls(scaled, weights, log_z, shifted, None if top1 is None else top1.squeeze(-1))

    def logprobs(self) -> torch.Tensor:
        return self.scaled - self.log_z

    def nll(self, labels: torch.Tensor, temperature: float) -> float:
        """Sum of NLL at T=1 of this chunk's ``labels`` (one per position; negative: none, as
        the last token of a sequence, whose successor is unknown)."""
        at = (labels >= 0).nonzero().squeeze(1)
        if at.numel() == 0:
            return 0.0
        picked = self.shifted[at, labels[at].long()].unsqueeze(1)  # one entry per position, not a row copy
        if temperature == 1.0:  # (copying the rows [chunk, vocab] was 15% of sampled extraction on one core)
            log_z1 = self.log_z[at]
        else:
            log_z1 = torch.logsumexp(self.shifted[at], dim=-1, keepdim=True)
        return float((log_z1 - picked).sum())


CHUNK = 16


def chunk_positions(logits: torch.Tensor) -> int:
    """Positions per chunk: ``CHUNK`` on a CPU (cache-sized temporaries), the whole row elsewhere
    (fewest launches and synchronizations)."""
    return CHUNK if logits.device.type == "cpu" else max(1, logits.shape[0])


class Scratch:
    """The [chunk, vocab] float32 buffers a chunk's distribution is computed into, made once per
    row and reused by each of its chunks. With glibc's default malloc a fresh buffer costs more
    than the operation: on one core at vocab 49,152, ``exp`` into a new tensor took 0.064
    ms/token against 0.020 into a reused one (a new tensor's pages are faulted in, 4 KB at a
    time). A row's sampled extraction, measured twice each: 0.27-0.29 -> 0.21 ms/token with the
    default malloc, 0.20 -> 0.18-0.19 with malloc on huge pages (as kdscale's Ray workers run:
    :mod:`kdscale.ray_runtime`). The values are the same operations' (identical targets)."""

    def __init__(self, logits: torch.Tensor, temperature: float):
        shape = (min(chunk_positions(logits), logits.shape[0]), logits.shape[-1])
        self.shifted = torch.empty(shape, dtype=torch.float32, device=logits.device)
        self.weights = torch.empty_like(self.shifted)
        self.scaled = self.shifted if temperature == 1.0 else torch.empty_like(self.shifted)

    def views(self, rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(shifted, scaled, weights) for a chunk of ``rows`` positions (scaled is shifted at T=1)."""
        return self.shifted[:rows], self.scaled[:rows], self.weights[:rows]


def _chunks(logits: torch.Tensor, temperature: float, with_top1: bool = False):
    """Each chunk's distribution, in buffers the next chunk overwrites: use it before the next."""
    scratch, step = Scratch(logits, temperature), chunk_positions(logits)
    for start in range(0, logits.shape[0], step):
        yield start, RowDistribution.of(logits[start : start + step], temperature, with_top1, scratch)


def _concat(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]} if parts else {}


def sampled(
    logits: torch.Tensor, temperature: float, num_samples: int, generator: torch.Generator, store_logprobs: bool = False
) -> dict[str, np.ndarray]:
    """Unique sampled ids per position (ascending), their counts, and ids per position; with
    ``store_logprobs`` also the teacher's log-prob of each stored id.

    ``logits``: [positions, vocab] already sliced to the true vocabulary."""
    from kdscale.cache.kinds import kind

    sampler = kind("sampled")
    return _concat(
        [
            sampler.extract(
                d, num_samples=num_samples, k=0, generator=generator, store_logprobs=store_logprobs, draws=1
            )
            for _, d in _chunks(logits, temperature)
        ]
    )


def topk(logits: torch.Tensor, temperature: float, k: int) -> dict[str, np.ndarray]:
    """The k most likely ids with their log-probs, and the tail mass they leave uncovered."""
    from kdscale.cache.kinds import kind

    top = kind("topk")
    return _concat(
        [
            top.extract(d, num_samples=0, k=k, generator=None, store_logprobs=False, draws=1)
            for _, d in _chunks(logits, temperature)
        ]
    )


def extract_row(
    kind: str,
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float,
    num_samples: int,
    k: int,
    seed: int,
    sid: str,
    store_logprobs: bool = False,
    with_top1: bool = False,
    draws: int = 1,
) -> dict[str, np.ndarray | float]:
    """Everything a cache row stores for one row, from one pass over its logits [positions,
    vocab]: the targets of ``kind``, the teacher's summed NLL (T=1) of ``labels`` (one per
    position, negative where there is none) and, optionally, its argmax."""
    from kdscale.cache.kinds import kind as target_kind

    extractor = target_kind(kind)
    generator = row_generator(seed, sid, logits.device) if extractor.draws_seeded else None
    labels = labels.to(logits.device)
    parts, top1 = [], []
    nll = 0.0
    for start, d in _chunks(logits, temperature, with_top1):
        parts.append(
            extractor.extract(
                d, num_samples=num_samples, k=k, generator=generator, store_logprobs=store_logprobs, draws=draws
            )
        )
        nll += d.nll(labels[start : start + d.scaled.shape[0]], temperature)
        if d.top1 is not None:
            top1.append(d.top1)
    out: dict = _concat(parts)
    out["teacher_nll"] = nll
    if with_top1:
        out["teacher_top1"] = host(torch.cat(top1).to(torch.int32))
    return out
