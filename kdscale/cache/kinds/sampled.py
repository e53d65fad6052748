"""``sampled`` (RS-KD, Anshumann et al. 2025): N draws with replacement from softmax(z/T); the
unique ids and their counts are stored, so counts/N is an unbiased estimate of the teacher's
distribution at ~12-16 ids per token instead of a biased top-k. With ``draws`` R > 1, R
independent N-draws per position are stored and epoch e trains on draw e mod R."""

from __future__ import annotations

import numpy as np
import torch

from kdscale.cache import idcodec, segments
from kdscale.cache.kinds.base import TargetKind, host
from kdscale.targets import SparseTargets


def unique_counts(draws: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row of ``draws`` [rows, n]: the ascending unique ids, their counts, and how many
    unique ids each row has (rows concatenated)."""
    draws, _ = draws.sort(dim=-1)
    first = torch.ones_like(draws, dtype=torch.bool)
    first[:, 1:] = draws[:, 1:] != draws[:, :-1]
    flat_first = first.reshape(-1)
    starts = flat_first.nonzero().squeeze(1)
    ends = torch.cat([starts[1:], torch.tensor([flat_first.numel()], device=draws.device)])
    return draws.reshape(-1)[starts], ends - starts, first.sum(dim=-1)


class Sampled(TargetKind):
    name = "sampled"
    uses_num_samples = True
    draws_seeded = True
    supports_draws = True
    optional_logprobs = True

    def columns(self, store_logprobs):
        return ("target_ids", "target_counts", "target_lengths") + (("target_logprobs",) if store_logprobs else ())

    def extract(self, d, *, num_samples, k, generator, store_logprobs, draws):
        """Draws stored position-major (position 0's draws, then position 1's, ...). With one draw
        the generator is consumed exactly as before draws existed, so those caches are
        reproduced byte for byte."""
        if draws == 1:
            samples = torch.multinomial(d.weights, num_samples, replacement=True, generator=generator)
        else:
            per_draw = [
                torch.multinomial(d.weights, num_samples, replacement=True, generator=generator) for _ in range(draws)
            ]
            samples = torch.stack(per_draw, dim=1).reshape(-1, num_samples)
        ids, counts, lengths = unique_counts(samples)
        out = {
            "target_ids": host(ids.to(torch.int32)),
            "target_counts": host(counts.to(torch.uint8)),
            "target_lengths": host(lengths.to(torch.uint8)),
        }
        if store_logprobs:
            segment_position = torch.arange(d.scaled.shape[0], device=ids.device).repeat_interleave(draws)
            positions = torch.repeat_interleave(segment_position, lengths)
            out["target_logprobs"] = host(d.scaled[positions, ids] - d.log_z[positions, 0])
        return out

    def code(self, row, positions, rank):
        return segments.code(row, "target_ids", row["target_lengths"], ("target_counts", "target_logprobs"), rank)

    def decode(self, batch, m, order, epoch, temperature):
        b, seq_len = batch.num_rows, m.dataset.seq_len
        lengths = segments.flat(batch.column("target_lengths")).astype(np.int64)
        raw_ids = idcodec.decode(segments.flat(batch.column("target_ids")), lengths, order)
        counts = segments.flat(batch.column("target_counts")).astype(np.float32)
        if m.targets.draws > 1:
            picked, lengths = segments.select_draw(lengths, m.targets.draws, epoch % m.targets.draws)
            raw_ids, counts = raw_ids[picked], counts[picked]
        ids, counts = segments.pad_segments([raw_ids, counts], lengths, [0, 0.0])
        probs = counts / float(m.targets.num_samples)
        return SparseTargets(
            torch.from_numpy(ids.astype(np.int64)).view(b, seq_len, -1), torch.from_numpy(probs).view(b, seq_len, -1)
        )

    def ids_per_position(self, table, m, positions):  # all draws of a position together
        lengths = segments.flat(table.column("target_lengths")).astype(np.int64)
        return lengths.reshape(positions, m.targets.draws).sum(axis=1)

    def leaf_counts(self, t, positions, vocab_size):
        return {"target_lengths": positions * t.draws}

    def content_problems(self, table, m):
        counts = segments.flat(table.column("target_counts")).astype(np.int64)
        lengths = segments.flat(table.column("target_lengths")).astype(np.int64)
        sums = np.add.reduceat(counts, idcodec.segment_starts(lengths)) if len(lengths) else counts
        if len(sums) and not (sums == m.targets.num_samples).all():
            return [
                f"draw counts per position sum to {sorted(set(sums.tolist()))[:5]}, the manifest says "
                f"num_samples {m.targets.num_samples}"
            ]
        return []
