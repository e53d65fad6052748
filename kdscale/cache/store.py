"""A committed logit cache as one object: open it (through the verification every reader uses),
look at its manifest and splits, and read decoded batches for a loss — without knowing the file
layout, the id coding or the commit protocol."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from kdscale.cache.format import Manifest
from kdscale.cache.reader import batch_input_ids, batch_targets, load_rank_order, read_split


@dataclass
class LogitCache:
    """``LogitCache.open(uri)`` — a verified cache. ``targets`` and ``batches`` decode rows into
    the target tensors the losses take (kdscale.student.losses)."""

    uri: str
    manifest: Manifest
    _order: np.ndarray | None = field(default=None, repr=False)

    @classmethod
    def open(cls, uri: str, checksums: bool = True, tokenizer: tuple[str, int] | None = None) -> LogitCache:
        """Every check (:func:`kdscale.cache.verify.open_cache`); ``checksums`` adds every file's sha256."""
        from kdscale import fs
        from kdscale.cache.verify import open_cache

        uri = fs.normalize(uri)
        return cls(uri, open_cache(uri, checksums=checksums, tokenizer=tokenizer))

    @property
    def cache_id(self) -> str:
        return self.manifest.cache_id

    @property
    def kind(self) -> str:
        return self.manifest.targets.kind

    @property
    def splits(self) -> dict[str, int]:
        """Rows per split."""
        return dict(self.manifest.dataset.rows)

    @property
    def totals(self) -> dict[str, Any]:
        return dict(self.manifest.totals)

    def read(self, split: str = "train", max_rows: int | None = None) -> pa.Table:
        """A whole split's stored rows (page checksums verified while reading)."""
        return read_split(self.uri, self.manifest, split, max_rows)

    def targets(self, rows: pa.Table, epoch: int = 0, temperature: float | None = None):
        """The teacher's distribution for ``rows`` (SparseTargets or DenseTargets)."""
        if self._order is None:
            self._order = load_rank_order(self.uri, self.manifest)
        return batch_targets(rows, self.manifest, self._order, epoch, temperature)

    def batches(self, split: str = "train", batch_size: int = 8, epoch: int = 0) -> Iterator[tuple[Any, Any]]:
        """(input_ids [B, L], targets) for consecutive rows of a split (causal LM caches)."""
        table = self.read(split)
        for start in range(0, table.num_rows, batch_size):
            rows = table.slice(start, batch_size)
            yield batch_input_ids(rows), self.targets(rows, epoch)
