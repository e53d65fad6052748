"""Turn a corpus (files, globs, fsspec URIs) into packed fixed-length token sequences.

Documents are tokenized, joined with the tokenizer's end-of-text token and cut into ``seq_len``
windows (the tail that does not fill a window is dropped). Each sequence is keyed by a hash of its
token ids (``seq_id``), so the held-out split, the sampling seed and resume all depend on
content, not on file order or worker count.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from kdscale import fs
from kdscale.config import CorpusSpec

HELDOUT_HASH_SPACE = 1 << 32


def seq_id(ids: np.ndarray) -> str:
    """16 hex chars (64 bits) of blake2b over the little-endian int32 token ids."""
    return hashlib.blake2b(np.ascontiguousarray(ids, dtype="<i4").tobytes(), digest_size=8).hexdigest()


def is_heldout(sid: str, fraction: float) -> bool:
    """Deterministic split by content hash: stable across reruns, workers and corpus order."""
    return int(sid[8:16], 16) < fraction * HELDOUT_HASH_SPACE


@dataclass
class PackedCorpus:
    seq_len: int
    train: list[np.ndarray] = field(default_factory=list)
    heldout: list[np.ndarray] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    documents: int = 0

    @property
    def tokens(self) -> int:
        return (len(self.train) + len(self.heldout)) * self.seq_len

    def content_hash(self) -> str:
        """Hash of every packed sequence in order, per split: what the cache was computed over."""
        h = hashlib.sha256(f"seq_len={self.seq_len}".encode())
        for name, rows in (("train", self.train), ("heldout", self.heldout)):
            h.update(name.encode())
            for row in rows:
                h.update(seq_id(row).encode())
        return h.hexdigest()


def iter_documents(spec: CorpusSpec) -> Iterator[tuple[str, str]]:
    """(uri, text) for every file the spec names, in sorted order, capped by ``max_files``."""
    seen: set[str] = set()
    count = 0
    for pattern in spec.paths:
        for uri in fs.expand(pattern):
            if uri in seen:
                continue
            seen.add(uri)
            yield uri, fs.read_bytes(uri).decode("utf-8", errors="replace")
            count += 1
            if spec.max_files and count >= spec.max_files:
                return


def pack_corpus(spec: CorpusSpec, tokenizer, separator_id: int | None = None) -> PackedCorpus:
    """Tokenize and pack; stops once ``max_tokens`` tokens are packed (a fixed, reproducible slice)."""
    sep = tokenizer.eos_token_id if separator_id is None else separator_id
    if sep is None:
        raise ValueError("the tokenizer has no end-of-text token to separate documents")
    packed = PackedCorpus(seq_len=spec.seq_len)
    buffer: list[int] = []
    limit = spec.max_tokens
    for uri, text in iter_documents(spec):
        if not text.strip():
            continue
        packed.sources.append(uri)
        packed.documents += 1
        buffer.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        buffer.append(sep)
        while len(buffer) >= spec.seq_len:
            row = np.asarray(buffer[: spec.seq_len], dtype=np.int32)
            del buffer[: spec.seq_len]
            (packed.heldout if is_heldout(seq_id(row), spec.heldout_fraction) else packed.train).append(row)
            if limit and packed.tokens >= limit:
                return packed
    return packed
