"""Turn a corpus (files, globs, fsspec URIs) into packed fixed-length token sequences.

Documents are tokenized, joined with the tokenizer's end-of-text token and cut into ``seq_len``
windows (the tail that does not fill a window is dropped). Each sequence is keyed by a hash of its
token ids (``seq_id``), so the held-out split, the sampling seed and resume all depend on
content, not on file order or worker count.

Three splits by content hash: ``heldout`` (the reported one), ``validation`` (the one settings
are chosen on, so a sweep never peeks at the reported split) and ``train``. The hash bits below
``heldout_fraction`` are held out, the next ``validation_fraction`` validate: adding a validation
split takes its rows from train and leaves the held-out rows exactly as they were.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
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

    @property
    def splits(self) -> dict[str, list[np.ndarray]]:
        return {"train": self.train, "heldout": self.heldout, "validation": self.validation}

    @property
    def tokens(self) -> int:
        return sum(len(rows) for rows in self.splits.values()) * self.seq_len

    def content_hash(self) -> str:
        """Hash of every packed sequence in order, per split: what the cache was computed over."""
        return split_hash(f"seq_len={self.seq_len}", self.splits, seq_id)


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


def file_documents(uri: str, fmt: str, field: str) -> Iterator[str]:
    """The documents of one file: the whole file (text), one JSON field per line (jsonl), or one
    column value per row (parquet). Empty documents are skipped."""
    if fmt == "text":
        text = decode_text(uri, fs.read_bytes(uri))
        if text.strip():
            yield text
        return
    if fmt == "jsonl":
        for n, line in enumerate(decode_text(uri, fs.read_bytes(uri)).splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise CorpusError(f"{uri}:{n}: not JSON ({e.msg})") from None
            value = record.get(field) if isinstance(record, dict) else None
            if not isinstance(value, str):
                raise CorpusError(f"{uri}:{n}: no string field {field!r}")
            if value.strip():
                yield value
        return
    if fmt == "parquet":
        import pyarrow.parquet as pq

        fsys, path = fs.filesystem(uri)
        with fsys.open(path, "rb") as f:
            pf = pq.ParquetFile(f)
            if field not in pf.schema_arrow.names:
                raise CorpusError(f"{uri}: no column {field!r} (columns: {', '.join(pf.schema_arrow.names)})")
            for batch in pf.iter_batches(columns=[field], batch_size=1024):
                for value in batch.column(0).to_pylist():
                    if isinstance(value, str) and value.strip():
                        yield value
        return
    raise ValueError(f"unknown corpus format {fmt!r}")


def tokenize_file(uri: str, fmt: str, field: str, tokenizer) -> list[np.ndarray]:
    """Token ids of each document of one file (no special tokens; packing adds separators)."""
    docs = list(file_documents(uri, fmt, field))
    if not docs:
        return []
    return [np.asarray(ids, dtype=np.int32) for ids in tokenizer(docs, add_special_tokens=False)["input_ids"]]


def local_token_stream(spec: CorpusSpec, tokenizer) -> Iterator[tuple[str, np.ndarray]]:
    """(file uri, document token ids) in corpus order, tokenized in this process."""
    for uri in corpus_files(spec):
        for ids in tokenize_file(uri, spec.format, spec.field, tokenizer):
            yield uri, ids


def pack_corpus(
    spec: CorpusSpec,
    tokenizer,
    documents: Iterable[tuple[str, np.ndarray]] | None = None,
    separator_id: int | None = None,
) -> PackedCorpus:
    """Pack tokenized documents (default: tokenized here, in order) into ``seq_len`` rows joined
    by the end-of-text token; stops once ``max_tokens`` tokens are packed (a fixed slice).

    Packing is sequential and cheap; the tokenization feeding it can run in parallel (Ray Data,
    :mod:`kdscale.data.ray_ingest`) as long as it yields documents in corpus order."""
    sep = tokenizer.eos_token_id if separator_id is None else separator_id
    if sep is None:
        raise ValueError("the tokenizer has no end-of-text token to separate documents")
    packed = PackedCorpus(seq_len=spec.seq_len)
    pending: list[np.ndarray] = []
    pending_len = 0
    limit = spec.max_tokens
    separator = np.asarray([sep], dtype=np.int32)
    for uri, ids in documents if documents is not None else local_token_stream(spec, tokenizer):
        if not packed.sources or packed.sources[-1] != uri:
            packed.sources.append(uri)
        packed.documents += 1
        pending += [ids, separator]
        pending_len += len(ids) + 1
        if pending_len < spec.seq_len:
            continue
        stream = np.concatenate(pending)
        full = len(stream) // spec.seq_len * spec.seq_len
        for row in stream[:full].reshape(-1, spec.seq_len):
            row = row.copy()
            packed.splits[split_of(seq_id(row), spec.heldout_fraction, spec.validation_fraction)].append(row)
            if limit and packed.tokens >= limit:
                return packed
        pending, pending_len = [stream[full:]], len(stream) - full
    return packed
