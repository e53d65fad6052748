"""A corpus (files, globs, fsspec URIs) as packed fixed-length token sequences: the files, the
row ids and splits, and the in-process packing of small corpora (:func:`pack_corpus`; reading
and packing a unit is :mod:`kdscale.data.units`).

Documents are tokenized, joined with the tokenizer's end-of-text token and cut into ``seq_len``
windows within each input unit (the tail that does not fill a window is dropped and counted).
Each sequence is keyed by a hash of its token ids (``seq_id``), so the held-out split, the
sampling seed and resume all depend on content, not on file order or worker count.

Three splits by content hash: ``heldout`` (the reported one), ``validation`` (the one settings
are chosen on, so a sweep never peeks at the reported split) and ``train``. The hash bits below
``heldout_fraction`` are held out, the next ``validation_fraction`` validate: adding a validation
split takes its rows from train and leaves the held-out rows exactly as they were.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

from kdscale import fs
from kdscale.config import CorpusSpec

HELDOUT_HASH_SPACE = 1 << 32


def seq_id(ids: np.ndarray) -> str:
    """16 hex chars (64 bits) of blake2b over the little-endian int32 token ids."""
    return hashlib.blake2b(np.ascontiguousarray(ids, dtype="<i4").tobytes(), digest_size=8).hexdigest()


def split_of(sid: str, heldout_fraction: float, validation_fraction: float = 0.0) -> str:
    """``heldout``, ``validation`` or ``train`` for a row id (see the module docstring): stable
    across reruns, workers and corpus order."""
    point = int(sid[8:16], 16)
    if point < heldout_fraction * HELDOUT_HASH_SPACE:
        return "heldout"
    if point < (heldout_fraction + validation_fraction) * HELDOUT_HASH_SPACE:
        return "validation"
    return "train"


def split_hash(header: str, splits: dict[str, list], row_id) -> str:
    """Hash of every row id in order, per split; an empty validation split is left out so caches
    made before it existed keep their content hash (and cache_id)."""
    h = hashlib.sha256(header.encode())
    for name, rows in splits.items():
        if name == "validation" and not rows:
            continue
        h.update(name.encode())
        for row in rows:
            h.update(row_id(row).encode())
    return h.hexdigest()


@dataclass
class PackedCorpus:
    seq_len: int
    train: list[np.ndarray] = field(default_factory=list)
    heldout: list[np.ndarray] = field(default_factory=list)
    validation: list[np.ndarray] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    documents: int = 0
    dropped_tokens: int = 0  # packing tails at unit ends
    unit_hashes: list[str] = field(default_factory=list)  # each packed unit's content hash, in order

    @property
    def splits(self) -> dict[str, list[np.ndarray]]:
        return {"train": self.train, "heldout": self.heldout, "validation": self.validation}

    @property
    def tokens(self) -> int:
        return sum(len(rows) for rows in self.splits.values()) * self.seq_len

    def content_hash(self) -> str:
        """The units' hash (:func:`kdscale.data.units.units_hash`): what a cache of these rows records."""
        from kdscale.data.units import units_hash

        return units_hash(self.unit_hashes)


def corpus_files(spec: CorpusSpec) -> list[str]:
    """Every file the spec names, de-duplicated, in sorted order, capped by ``max_files``."""
    files: list[str] = []
    seen: set[str] = set()
    for pattern in spec.paths:
        for uri in fs.expand(pattern):
            if uri not in seen:
                seen.add(uri)
                files.append(uri)
    return files[: spec.max_files] if spec.max_files else files


class CorpusError(ValueError):
    """A corpus file kdscale will not train on; the message names the file (and line)."""


# A few undecodable bytes in a text corpus are noise worth keeping; more than this share of
# replacement characters means a binary or wrongly-encoded file, whose "text" is garbage tokens.
MAX_REPLACEMENT_SHARE = 0.01


def decode_text(uri: str, data: bytes) -> str:
    """UTF-8 text, undecodable bytes replaced; refuses a file that is mostly not UTF-8."""
    text = data.decode("utf-8", errors="replace")
    bad = text.count("\ufffd") - data.decode("utf-8", errors="ignore").count("\ufffd")
    if bad and bad > MAX_REPLACEMENT_SHARE * len(text):
        raise CorpusError(
            f"{uri}: {bad:,} of {len(text):,} characters ({bad / len(text):.0%}) are not UTF-8; "
            "a binary or wrongly encoded file (convert it to UTF-8 or drop it from corpus.paths)"
        )
    return text


def pack_corpus(spec: CorpusSpec, tokenizer) -> PackedCorpus:
    """The rows a precompute of ``spec`` caches, packed in this process: the same units
    (:mod:`kdscale.data.units`), the same packing, the same ``max_tokens`` cut. For small corpora
    only (online students, tests, benchmarks): every row is held in memory here."""
    from kdscale.data.units import SPLITS, list_units, pack_unit, rows_to_keep

    packed = PackedCorpus(seq_len=spec.seq_len)
    limit = spec.max_tokens
    for unit in list_units(corpus_files(spec), spec.format, spec.unit_bytes):
        fractions = (spec.heldout_fraction, spec.validation_fraction)
        part = pack_unit(unit, spec.field, tokenizer, spec.seq_len, *fractions, max_tokens=limit)
        keep = rows_to_keep(packed.tokens, len(part.seq_ids), spec.seq_len, limit)
        if keep is not None:
            part = part.truncated(keep)
        for row, code in zip(part.rows, part.splits):
            packed.splits[SPLITS[code]].append(row)
        packed.sources += [p.uri for p in unit.pieces if p.uri not in packed.sources]
        packed.documents += part.documents
        packed.dropped_tokens += part.dropped_tokens
        packed.unit_hashes.append(part.content_hash())
        if limit and packed.tokens >= limit:
            break
    return packed
