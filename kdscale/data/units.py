"""Input units: a corpus cut into deterministic pieces from file metadata alone, each read,
tokenized and packed on its own (by whichever Ray worker runs it), so no token ever has to pass
through the driver and the first teacher forward does not wait for a pass over the whole corpus.

A unit is one text file, a byte range of a JSONL file, or a run of row groups of a Parquet file.
Listing needs only ``fs`` metadata (path, size, etag/mtime) and, for Parquet, the file's footer:
the same corpus gives the same units on one machine or a hundred.

JSONL byte ranges [start, end) own the lines that *begin* inside them (the convention of
Hadoop's line splits): a reader seeks to ``start - 1``, skips to the next line break and reads
lines until one begins at or after ``end``. Every line belongs to exactly one unit, and no unit
needs to look at another.

Packing happens within a unit: documents are joined with the end-of-text token and cut into
``seq_len`` rows; the tail that does not fill a row is dropped and counted (``dropped_tokens``),
at most ``seq_len - 1`` tokens per unit.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import numpy as np

from kdscale import fs
from kdscale.data.corpus import CorpusError, decode_text, seq_id, split_of

# The default ``corpus.unit_bytes``: a unit of 32 MiB of JSONL is ~8M tokens, a few minutes of
# one 135M teacher replica on a GPU, a small enough loss on a crash, and few enough units (about
# 150 per billion tokens) for the driver.
UNIT_BYTES = 32 << 20
SPLITS = ("train", "heldout", "validation")


@dataclass(frozen=True)
class Piece:
    """A file, or a part of one: for JSONL the byte range [start, end), for Parquet the row groups
    [start, end), for text the whole file (start 0, end = size)."""

    uri: str
    fmt: str
    start: int
    end: int
    size: int  # of the whole file, so a changed file is a different piece
    version: str | None = None  # the filesystem's etag or mtime, where it has one
    nbytes: int = 0  # bytes of data: the range's length, or the row groups' uncompressed size

    def descriptor(self, base: str = "") -> dict:
        """What identifies the piece; ``base``: a prefix to drop from the URI, so a corpus moved
        (with its timestamps) to another folder or bucket keeps its identity."""
        d = asdict(self)
        if base and self.uri.startswith(base):
            d["uri"] = self.uri[len(base) :]
        return d


@dataclass(frozen=True)
class Unit:
    """Consecutive pieces of the corpus packed together: many small files grouped up to
    ``UNIT_BYTES``, or one range of a large file."""

    index: int
    pieces: tuple[Piece, ...]

    @property
    def bytes(self) -> int:
        return sum(p.nbytes for p in self.pieces)

    def descriptor(self, base: str = "") -> list[dict]:
        return [p.descriptor(base) for p in self.pieces]


def _version(info: dict) -> str | None:
    for name in ("ETag", "etag", "mtime", "LastModified", "last_modified", "created"):
        value = info.get(name)
        if value is not None:
            return str(value).strip('"')
    return None


def file_pieces(uri: str, fmt: str, unit_bytes: int = UNIT_BYTES) -> list[Piece]:
    """The pieces of one file, from its metadata (and a Parquet footer) only."""
    fsys, path = fs.filesystem(uri)
    info = fsys.info(path)
    size, version = int(info.get("size") or 0), _version(info)
    if fmt == "jsonl" and size > unit_bytes:
        return [
            Piece(uri, fmt, s, min(s + unit_bytes, size), size, version, min(s + unit_bytes, size) - s)
            for s in range(0, size, unit_bytes)
        ]
    if fmt == "parquet":
        import pyarrow.parquet as pq

        with fsys.open(path, "rb") as f:
            meta = pq.ParquetFile(f).metadata
        pieces, first, acc = [], 0, 0
        for g in range(meta.num_row_groups):
            acc += meta.row_group(g).total_byte_size
            if acc >= unit_bytes or g == meta.num_row_groups - 1:
                pieces.append(Piece(uri, fmt, first, g + 1, size, version, acc))
                first, acc = g + 1, 0
        return pieces
    return [Piece(uri, fmt, 0, size, size, version, size)]


def list_units(files: list[str], fmt: str, unit_bytes: int = UNIT_BYTES) -> list[Unit]:
    """Every unit of the corpus in corpus order: pieces in file order, consecutive small ones
    grouped until a unit holds ``unit_bytes``."""
    units: list[Unit] = []
    group: list[Piece] = []
    held = 0
    for piece in (p for uri in files for p in file_pieces(uri, fmt, unit_bytes)):
        if group and held + piece.nbytes > unit_bytes:
            units.append(Unit(len(units), tuple(group)))
            group, held = [], 0
        group.append(piece)
        held += piece.nbytes
    if group:
        units.append(Unit(len(units), tuple(group)))
    return units


# Reading ----------------------------------------------------------------------------------------


def _jsonl_lines(piece: Piece) -> Iterator[tuple[int, bytes]]:
    """(byte offset, line) of every line that begins in the piece's range."""
    fsys, path = fs.filesystem(piece.uri)
    with fsys.open(path, "rb") as f:
        offset = piece.start
        if piece.start > 0:
            f.seek(piece.start - 1)
            offset = piece.start - 1 + len(f.readline())  # the rest of the line the previous piece owns
        while offset < piece.end:
            line = f.readline()
            if not line:
                return
            yield offset, line
            offset += len(line)


def piece_documents(piece: Piece, field: str) -> Iterator[str]:
    """The non-empty documents of one piece; a bad record names the file and its line (or, in a
    later piece of a large file, its byte offset)."""
    if piece.fmt == "text":
        text = decode_text(piece.uri, fs.read_bytes(piece.uri))
        if text.strip():
            yield text
    elif piece.fmt == "jsonl":
        yield from _jsonl_documents(piece, field)
    elif piece.fmt == "parquet":
        yield from _parquet_documents(piece, field)
    else:
        raise ValueError(f"unknown corpus format {piece.fmt!r}")


def _jsonl_documents(piece: Piece, field: str) -> Iterator[str]:
    for n, (offset, raw) in enumerate(_jsonl_lines(piece), 1):
        # a line number where it is known (the file's first piece), else the byte offset
        where = f"{piece.uri}:{n}" if piece.start == 0 else f"{piece.uri}:byte {offset}"
        line = decode_text(where, raw)
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise CorpusError(f"{where}: not JSON ({e.msg})") from None
        value = record.get(field) if isinstance(record, dict) else None
        if not isinstance(value, str):
            raise CorpusError(f"{where}: no string field {field!r}")
        if value.strip():
            yield value


def _parquet_documents(piece: Piece, field: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    fsys, path = fs.filesystem(piece.uri)
    with fsys.open(path, "rb") as f:
        pf = pq.ParquetFile(f)
        if field not in pf.schema_arrow.names:
            raise CorpusError(f"{piece.uri}: no column {field!r} (columns: {', '.join(pf.schema_arrow.names)})")
        groups = list(range(piece.start, piece.end))
        for batch in pf.iter_batches(columns=[field], row_groups=groups, batch_size=1024):
            for value in batch.column(0).to_pylist():
                if isinstance(value, str) and value.strip():
                    yield value


def unit_documents(unit: Unit, field: str) -> Iterator[str]:
    for piece in unit.pieces:
        yield from piece_documents(piece, field)


# Packing ----------------------------------------------------------------------------------------


@dataclass
class PackedUnit:
    """One unit's rows in packing order, each with its split; what its shards are cut from."""

    unit: Unit
    rows: np.ndarray  # [n, seq_len] int32
    splits: np.ndarray  # [n] index into SPLITS
    seq_ids: list[str]
    documents: int
    dropped_tokens: int  # the tail that did not fill a row

    @property
    def tokens(self) -> int:
        return int(self.rows.size)

    def split_slice(self, split: str, start: int, stop: int) -> tuple[np.ndarray, list[str]]:
        """Rows [start, stop) of one split, with their ids: indexes the split's rows only, so a
        unit cut into many shards is not copied once per shard."""
        picked = np.flatnonzero(self.splits == SPLITS.index(split))[start:stop]
        return self.rows[picked], [self.seq_ids[i] for i in picked]

    def content_hash(self) -> str:
        """sha256 over the unit's row ids in packing order with their splits."""
        h = hashlib.sha256(f"seq_len={self.rows.shape[1]}".encode())
        for sid, code in zip(self.seq_ids, self.splits):
            h.update(f"{SPLITS[code]}:{sid}".encode())
        return h.hexdigest()

    def truncated(self, rows: int) -> PackedUnit:
        """The first ``rows`` rows (the last unit of a ``max_tokens`` slice: no packing tail)."""
        return PackedUnit(self.unit, self.rows[:rows], self.splits[:rows], self.seq_ids[:rows], self.documents, 0)


def pack_unit(
    unit: Unit,
    field: str,
    tokenizer,
    seq_len: int,
    heldout_fraction: float,
    validation_fraction: float,
    max_tokens: int | None = None,
) -> PackedUnit:
    """Read, tokenize and pack one unit (documents joined by the end-of-text token). With
    ``max_tokens`` (the job's slice, more than any one unit can contribute) reading stops once
    that many tokens are packed: the quickstart's 40,960-token slice of a 2.9M-token unit."""
    sep = tokenizer.eos_token_id
    if sep is None:
        raise ValueError("the tokenizer has no end-of-text token to separate documents")
    pieces: list[np.ndarray] = []
    packed, documents = 0, 0
    for docs in _batches(unit_documents(unit, field), TOKENIZE_BATCH):
        documents += len(docs)
        for ids in tokenizer(docs, add_special_tokens=False)["input_ids"]:
            pieces += [np.asarray(ids, dtype=np.int32), np.asarray([sep], dtype=np.int32)]
            packed += len(ids) + 1
        if max_tokens and packed // seq_len * seq_len >= max_tokens:
            break
    stream = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int32)
    full = len(stream) // seq_len * seq_len
    rows = stream[:full].reshape(-1, seq_len)
    ids = [seq_id(r) for r in rows]
    splits = np.asarray([SPLITS.index(split_of(s, heldout_fraction, validation_fraction)) for s in ids], dtype=np.int8)
    return PackedUnit(unit, rows, splits, ids, documents, len(stream) - full)


TOKENIZE_BATCH = 256  # documents per tokenizer call: fast tokenizers batch them across threads


def _batches(items: Iterator[str], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def rows_to_keep(tokens_before: int, unit_rows: int, seq_len: int, max_tokens: int | None) -> int | None:
    """How many of a unit's rows a ``max_tokens`` slice keeps once ``tokens_before`` are packed
    (None: all of them): rows until the slice is full, the last one included."""
    if not max_tokens or tokens_before + unit_rows * seq_len <= max_tokens:
        return None
    return -(-(max_tokens - tokens_before) // seq_len)


# Identity ---------------------------------------------------------------------------------------


def corpus_base(units: list[Unit]) -> str:
    """The longest folder prefix shared by every piece's URI: dropped from descriptors, so the
    same corpus moved elsewhere (timestamps kept: ``cp -p``, ``aws s3 sync``) keeps its cache_id."""
    uris = [p.uri for u in units for p in u.pieces]
    if not uris:
        return ""
    prefix = uris[0]
    for uri in uris[1:]:
        while not uri.startswith(prefix):
            prefix = prefix[:-1]
    return prefix[: prefix.rfind("/") + 1]


def dataset_identity(units: list[Unit], packing: dict) -> str:
    """sha256 over the units' descriptors (base-relative paths, ranges, sizes, versions) and the
    packing settings: the corpus's part of the cache_id, known before any file is read."""
    base = corpus_base(units)
    payload = {"packing": packing, "units": [u.descriptor(base) for u in units]}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def units_hash(hashes) -> str:
    """The dataset's content hash: sha256 over the units' content hashes in unit order."""
    h = hashlib.sha256(b"units")
    for value in hashes:
        h.update(value.encode())
    return h.hexdigest()
