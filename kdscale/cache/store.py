"""A committed logit cache as one object: open it (through the verification every reader uses),
look at its manifest and splits, and read decoded batches for a loss — without knowing the file
layout, the id coding or the commit protocol; and its counterpart, the writer that alone knows
the commit order."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from kdscale.cache import writer
from kdscale.cache.format import (
    LEDGER_DIR,
    DatasetInfo,
    Manifest,
    ShardRecord,
    TargetsInfo,
    TeacherInfo,
    TokenizerInfo,
    UnitRecord,
)
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


class CacheWriter:
    """The one place that knows the commit order of a cache: claim the folder for a cache_id
    (refusing one begun for another), take the lease, store the id-coding rank table, record each
    finished shard in the ledger as it lands, and write the manifest last — the commit. Shards
    themselves are written by whoever computed them (a teacher actor, a test, a benchmark).

        with CacheWriter(uri, cache_id, rank_order) as w:
            for task in tasks_not_in(w.finished):
                w.record(write_shard(uri, ...))
            manifest, stale = w.commit(targets=..., teacher=..., tokenizer=..., dataset=..., order=names)

    Leaving the block without a commit (an exception) releases the lease and keeps the ledger,
    so a rerun resumes with the finished shards."""

    def __init__(self, uri: str, cache_id: str, rank_order: np.ndarray, token_bytes: Any = None):
        """``token_bytes``: the teacher vocabulary's bytes (kdscale.data.alignment.TokenBytes),
        stored so students with their own tokenizer can align to the rows; None when the
        tokenizer's bytes cannot be recovered exactly (or for images)."""
        self.uri = uri
        self.cache_id = cache_id
        self.rank_order = rank_order
        self.token_bytes = token_bytes
        self.alignment: dict[str, Any] | None = None
        self.id_coding: dict[str, Any] = {}
        self.finished: dict[str, ShardRecord] = {}
        self.units: dict[int, UnitRecord] = {}

    def __enter__(self) -> CacheWriter:
        from kdscale import fs

        fs.makedirs(self.uri)
        writer.start_or_check_plan(self.uri, self.cache_id)
        writer.acquire_lease(self.uri)
        self.id_coding = writer.write_rank_file(self.uri, self.rank_order)
        if self.token_bytes is not None:
            self.alignment = writer.write_token_bytes(self.uri, self.token_bytes)
        self.finished = writer.finished_shards(self.uri)
        self.units = writer.recorded_units(self.uri)
        return self

    def record(self, record: ShardRecord) -> None:
        """A shard is fully written: from now on a rerun skips it."""
        writer.write_ledger_entry(self.uri, record)
        self.finished[record.path] = record

    def record_unit(self, record: UnitRecord) -> None:
        """A unit is packed (before its shards are computed); a rerun that re-reads it must get
        the same content hash (:class:`~kdscale.cache.format.CacheFormatError` otherwise)."""
        from kdscale.cache.format import CacheFormatError

        known = self.units.get(record.index)
        if known is not None and known.content_hash != record.content_hash:
            files = ", ".join(sorted({p["uri"] for p in record.pieces}))
            raise CacheFormatError(
                f"input unit {record.index} ({files}) no longer holds the rows this unfinished cache was begun "
                f"with (content hash {known.content_hash[:16]}…, now {record.content_hash[:16]}…): a corpus file "
                "changed; restore it, or delete the cache folder to start over"
            )
        if known is None:
            writer.write_unit_entry(self.uri, record)
            self.units[record.index] = record

    def commit(
        self,
        *,
        targets: TargetsInfo,
        teacher: TeacherInfo,
        tokenizer: TokenizerInfo,
        dataset: DatasetInfo,
        order: list[str],
    ) -> tuple[Manifest, int]:
        """Write the manifest over the shards named in ``order`` (every one must be recorded);
        returns it and how many temp files killed writers had left behind (removed first)."""
        from kdscale import fs

        missing = [name for name in order if name not in self.finished]
        if missing:
            raise RuntimeError(f"cannot commit {self.uri}: shard(s) not recorded: {', '.join(missing[:5])}")
        stale = fs.remove_temp_files(self.uri) + fs.remove_temp_files(fs.join(self.uri, LEDGER_DIR))
        manifest = writer.build_manifest(
            cache_id=self.cache_id,
            targets=targets,
            teacher=teacher,
            tokenizer=tokenizer,
            dataset=dataset,
            id_coding=self.id_coding,
            shards=[self.finished[name] for name in order],
            alignment=self.alignment,
        )
        writer.commit(self.uri, manifest)
        return manifest, len(stale)

    def __exit__(self, *exc: object) -> None:
        writer.release_lease(self.uri)
