"""The corpus as a stream of packed units on Ray (the thin Ray side of :mod:`kdscale.data.units`).

Each unit is read, tokenized and packed by a Ray task on whichever node runs it; its rows stay
in Ray's object store and go from there to the teacher actor that needs them. The driver gets
only a unit's metadata (row counts per split, content hash, a token histogram for the id-coding
sample units only) and an ObjectRef, so its memory does not grow with the corpus. A few units are tokenized
ahead of the teacher (``lookahead``); units come back in corpus order, and ``max_tokens`` cuts
the stream at the same row whatever the cluster.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import ray

from kdscale.data.corpus import CorpusError
from kdscale.data.units import SPLITS, PackedUnit, Unit, pack_unit, rows_to_keep
from kdscale.errors import find_in_chain


@dataclass
class UnitMeta:
    """What the driver knows of a packed unit (no token ids)."""

    index: int
    rows: int
    split_codes: np.ndarray  # [rows] int8: the split of each row in packing order (1 byte per row)
    content_hash: str
    documents: int
    dropped_tokens: int
    histogram: np.ndarray | None  # token counts of the unit's rows; only while the id-coding sample fills

    def split_rows(self) -> dict[str, int]:
        counts = np.bincount(self.split_codes, minlength=len(SPLITS))
        return {name: int(counts[i]) for i, name in enumerate(SPLITS)}


def _meta(packed: PackedUnit, histogram_of: int | None) -> UnitMeta:
    """``histogram_of``: the vocabulary size when the id-coding sample still needs this unit's
    token counts, else None (a 49k-vocab histogram is ~0.4 MB per unit: not sent when unused)."""
    histogram = None
    if histogram_of is not None:
        histogram = np.bincount(packed.rows.ravel(), minlength=histogram_of).astype(np.int64)
    return UnitMeta(
        packed.unit.index,
        len(packed.seq_ids),
        packed.splits,
        packed.content_hash(),
        packed.documents,
        packed.dropped_tokens,
        histogram,
    )


# Packing tasks reserve no CPU: teacher actors may hold every CPU of a node, and a task waiting for
# one would then wait forever; the lookahead bounds how many run at once.
@ray.remote(num_returns=2, num_cpus=0)
def _pack(
    unit: Unit,
    field: str,
    tokenizer,
    seq_len: int,
    fractions: tuple[float, float],
    limit: int | None,
    histogram_of: int | None,
):
    packed = pack_unit(unit, field, tokenizer, seq_len, *fractions, max_tokens=limit)
    return _meta(packed, histogram_of), packed


@ray.remote(num_returns=2, num_cpus=0)
def _truncate(packed: PackedUnit, rows: int, histogram_of: int | None):
    cut = packed.truncated(rows)
    return _meta(cut, histogram_of), cut


class UnitFeed:
    """Packed units in corpus order, tokenized ``lookahead`` units ahead, cut at ``max_tokens``.

    Units carry token histograms while ``histograms`` is set (the id-coding sample); units already
    submitted when it is cleared still carry one."""

    def __init__(self, spec, tokenizer, units: list[Unit], vocab_size: int, lookahead: int = 4):
        c = spec.corpus
        self.units = units
        self.seq_len = c.seq_len
        self.max_tokens = c.max_tokens
        self.vocab_size = vocab_size
        self.lookahead = max(1, lookahead)
        self._args = (
            c.field,
            ray.put(tokenizer),
            c.seq_len,
            (c.heldout_fraction, c.validation_fraction),
            c.max_tokens,
        )
        self.histograms = True
        self._submitted: dict[int, tuple[ray.ObjectRef, ray.ObjectRef]] = {}
        self._next = 0
        self.tokens = 0
        self.exhausted = False

    def _submit_ahead(self) -> None:
        while len(self._submitted) < self.lookahead and self._next < len(self.units):
            unit = self.units[self._next]
            self._submitted[unit.index] = _pack.remote(unit, *self._args, self._histogram_of())  # type: ignore[assignment]
            self._next += 1

    def __iter__(self) -> Iterator[tuple[UnitMeta, ray.ObjectRef]]:
        for unit in self.units:
            if self.max_tokens and self.tokens >= self.max_tokens:
                break
            self._submit_ahead()
            meta_ref, packed_ref = self._submitted.pop(unit.index)
            meta = _get(meta_ref)
            keep = rows_to_keep(self.tokens, meta.rows, self.seq_len, self.max_tokens)
            if keep is not None:
                meta_ref, packed_ref = _truncate.remote(packed_ref, keep, self._histogram_of())  # type: ignore[misc]
                meta = _get(meta_ref)
            self.tokens += meta.rows * self.seq_len
            yield meta, packed_ref
        for meta_ref, _ in self._submitted.values():  # tokenized ahead, past the slice
            ray.cancel(meta_ref)
        self._submitted.clear()
        self.exhausted = True

    def _histogram_of(self) -> int | None:
        return self.vocab_size if self.histograms else None


# The id-coding rank table comes from the first units up to this many tokens: deterministic, and
# bounded whatever the corpus. Measured on the Python library docs (1.61M SmolLM2 tokens): ranked on
# their first 1M tokens, the mean log2(rank) of every token (a proxy for the coded ids' size) is
# 0.49% above the whole corpus's own table; on 250k, 2.7%. 4M leaves that well under 0.5%.
RANK_SAMPLE_TOKENS = 4_000_000


@dataclass
class Stream:
    """A started feed: the first units (the id-coding sample) already packed, the rest to come."""

    sample: list[tuple[UnitMeta, ray.ObjectRef]]
    rest: Iterator[tuple[UnitMeta, ray.ObjectRef]]
    rank_order: np.ndarray
    complete: bool  # the sample is the whole (sliced) corpus

    def units(self) -> Iterator[tuple[UnitMeta, ray.ObjectRef]]:
        yield from self.sample
        yield from self.rest

    def sample_rows(self) -> dict[str, int]:
        per_unit = [m.split_rows() for m, _ in self.sample]
        return {split: sum(rows[split] for rows in per_unit) for split in SPLITS}


def begin_stream(spec, tokenizer, units: list[Unit], vocab_size: int, sample_tokens: int | None = None) -> Stream:
    """Start packing units and wait for the sample the rank table is ranked on (the first units
    up to ``sample_tokens``, default RANK_SAMPLE_TOKENS)."""
    sample_tokens = RANK_SAMPLE_TOKENS if sample_tokens is None else sample_tokens
    from kdscale.cache.idcodec import rank_from_counts

    feed = UnitFeed(spec, tokenizer, units, vocab_size, lookahead=max(2, int(ray.available_resources().get("CPU", 1))))
    stream = iter(feed)
    sample: list[tuple[UnitMeta, ray.ObjectRef]] = []
    counts = np.zeros(vocab_size, dtype=np.int64)
    for meta, ref in stream:
        sample.append((meta, ref))
        assert meta.histogram is not None  # every unit carries one until the sample is full
        counts += meta.histogram
        if counts.sum() >= sample_tokens:
            feed.histograms = False
            break
    complete = feed.exhausted or len(sample) == len(units)
    return Stream(sample, stream, rank_from_counts(counts, vocab_size), complete)


def _get(ref: ray.ObjectRef):
    """A task's result; a bad corpus file's CorpusError comes back as itself."""
    try:
        return ray.get(ref)
    except Exception as e:  # Ray wraps the task's exception
        cause = find_in_chain(e, ("CorpusError",))
        if cause is not None:
            raise CorpusError(str(cause)) from None
        raise
