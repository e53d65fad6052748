"""What a target kind is: everything kdscale does with one way of storing the teacher's
distribution — the spec checks, the stored columns, extraction from logits, id coding, decoding
for the loss, statistics and the checks a reader makes. One subclass per kind, one module each."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

if TYPE_CHECKING:
    import pyarrow as pa
    import torch

    from kdscale.cache.format import Manifest, TargetsInfo
    from kdscale.cache.targets import RowDistribution
    from kdscale.config import TargetsSpec
    from kdscale.targets import DenseTargets, SparseTargets


def host(t: torch.Tensor) -> np.ndarray:
    """A tensor's values on the host. Extraction runs where the teacher's logits are (a GPU's
    memory): only these sparse results cross to the host, not the [positions, vocab] logits
    (~0.2 MB per token at vocab 49k in float32). On the CPU this is free (no copy)."""
    return t.detach().cpu().numpy()


class TargetKind:
    name: ClassVar[str]
    uses_num_samples: ClassVar[bool] = False  # num_samples is part of its stored targets (and cache_id)
    uses_k: ClassVar[bool] = False
    draws_seeded: ClassVar[bool] = False  # extraction draws from a generator seeded by (job seed, seq_id)
    has_tail_mass: ClassVar[bool] = False
    can_retemper: ClassVar[bool] = False  # holds the whole distribution, so any loss temperature is exact
    supports_draws: ClassVar[bool] = False  # several independent draws per position (targets.draws > 1)
    optional_logprobs: ClassVar[bool] = False  # store_logprobs adds the teacher's log-prob of each stored id
    # extraction reads the whole logit vector (draws, the full softmax); False: the top-k log-probs
    # a backend such as a vLLM server returns are enough
    needs_full_logits: ClassVar[bool] = True

    def columns(self, store_logprobs: bool) -> tuple[str, ...]:
        """The Parquet columns holding this kind's data (what ``target_bytes`` counts)."""
        raise NotImplementedError

    def spec_problems(self, t: TargetsSpec, vocab_size: int) -> list[tuple[str, str]]:
        """Problems of the spec's targets once the vocabulary is known."""
        return []

    def problems(self, t: TargetsSpec, vocab_size: int) -> list[tuple[str, str]]:
        """Every problem of the spec's targets for this kind (the generic ones, then its own)."""
        found = []
        if t.draws > 1 and not self.supports_draws:
            found.append(("cache.targets.draws", f"draws > 1 applies to kind sampled only, not {self.name}"))
        return found + self.spec_problems(t, vocab_size)

    def extract(
        self,
        d: RowDistribution,
        *,
        num_samples: int,
        k: int,
        generator: torch.Generator | None,
        store_logprobs: bool,
        draws: int,
    ) -> dict[str, np.ndarray]:
        """This kind's columns for a chunk of positions of one row."""
        raise NotImplementedError

    def code(self, row: dict[str, Any], positions: int, rank: np.ndarray) -> dict[str, Any]:
        """The row's id columns rank-delta coded (their companions permuted alike); {} if none."""
        return {}

    def decode(
        self, batch: pa.Table, m: Manifest, order: np.ndarray, epoch: int, temperature: float | None
    ) -> SparseTargets | DenseTargets:
        """The teacher's distribution of a batch of stored rows, for the loss."""
        raise NotImplementedError

    def ids_per_position(self, table: pa.Table, m: Manifest, positions: int) -> np.ndarray:
        """Stored ids at each position (what the kind costs on disk)."""
        raise NotImplementedError

    def leaf_counts(self, t: TargetsInfo, positions: int, vocab_size: int) -> dict[str, int]:
        """Values of the columns whose size the kind fixes, for ``positions`` positions."""
        return {}

    def content_problems(self, table: pa.Table, m: Manifest) -> list[str]:
        """What a decode of a few stored rows can show is inconsistent with the manifest."""
        return []
