"""Reading a cache: manifest checks (committed? our format? our tokenizer?), checksums, and
turning stored columns back into target tensors for the loss."""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from kdscale import fs
from kdscale.cache import idcodec
from kdscale.cache.format import FORMAT_VERSION, ID_CODING_SCHEME, LEDGER_DIR, MANIFEST, CacheFormatError, Manifest


def open_manifest(cache_uri: str) -> Manifest:
    """The committed manifest, or a :class:`CacheFormatError` saying why the cache is unusable."""
    uri = fs.join(cache_uri, MANIFEST)
    if not fs.exists(uri):
        started = fs.exists(fs.join(cache_uri, LEDGER_DIR))
        hint = "precompute did not finish; rerun `kdscale precompute` to resume it" if started else "no cache here"
        raise CacheFormatError(f"incomplete cache: {cache_uri} has no {MANIFEST} ({hint})")
    if not fs.is_file(uri):
        raise CacheFormatError(f"{cache_uri}: {MANIFEST} is not a file")
    try:
        raw = fs.read_json(uri)
    except (ValueError, UnicodeDecodeError) as e:
        raise CacheFormatError(f"{cache_uri}: {MANIFEST} is not valid JSON ({e}); the cache is unusable") from None
    if not isinstance(raw, dict):
        raise CacheFormatError(f"{cache_uri}: {MANIFEST} is not a JSON object")
    version = raw.get("format_version") if isinstance(raw, dict) else None
    if version != FORMAT_VERSION:
        raise CacheFormatError(
            f"{cache_uri}: cache format_version {version!r} is not supported by this kdscale (reads {FORMAT_VERSION})"
        )
    try:
        return Manifest.model_validate(raw)
    except Exception as e:  # pydantic's message names the broken fields
        raise CacheFormatError(f"{cache_uri}: {MANIFEST} is malformed: {e}") from None


def check_tokenizer(manifest: Manifest, fingerprint: str, vocab_size: int, who: str = "student") -> None:
    tok = manifest.tokenizer
    if tok.fingerprint != fingerprint or tok.vocab_size != vocab_size:
        raise CacheFormatError(
            f"tokenizer mismatch: the cache {manifest.cache_id} was made with tokenizer {tok.fingerprint} "
            f"(vocab {tok.vocab_size}); the {who} uses tokenizer {fingerprint} (vocab {vocab_size})"
        )


def load_rank_order(cache_uri: str, manifest: Manifest) -> np.ndarray:
    """The id-coding rank table (``order[rank] = token id``), checked against its sha256."""
    coding = manifest.id_coding
    if coding.get("scheme") != ID_CODING_SCHEME:
        raise CacheFormatError(f"{cache_uri}: unknown id coding {coding.get('scheme')!r}")
    data = fs.read_bytes(fs.join(cache_uri, coding["rank_file"]))
    if hashlib.sha256(data).hexdigest() != coding["sha256"]:
        raise CacheFormatError(f"corrupted cache: {coding['rank_file']} does not match its sha256 in the manifest")
    order = pq.read_table(io.BytesIO(data)).column("token_id").to_numpy()
    if len(order) != manifest.tokenizer.vocab_size:
        raise CacheFormatError(
            f"{cache_uri}: rank table has {len(order)} entries, vocab is {manifest.tokenizer.vocab_size}"
        )
    return order.astype(np.int64)


def shard_uris(cache_uri: str, manifest: Manifest, split: str) -> list[str]:
    return [fs.join(cache_uri, s.path) for s in manifest.shards_of(split)]


def read_split(cache_uri: str, manifest: Manifest, split: str, max_rows: int | None = None) -> pa.Table:
    """A whole split as one table (held-out evaluation; training streams through Ray Data)."""
    tables = []
    rows = 0
    for uri in shard_uris(cache_uri, manifest, split):
        fsys, path = fs.filesystem(uri)
        with fsys.open(path, "rb") as f:
            tables.append(pq.read_table(f, page_checksum_verification=True))
        rows += tables[-1].num_rows
        if max_rows and rows >= max_rows:
            break
    table = pa.concat_tables(tables) if tables else pa.table({})
    return table.slice(0, max_rows) if max_rows else table


# Targets for the loss --------------------------------------------------------------------------


@dataclass
class SparseTargets:
    """Per-position sparse teacher distribution, padded to K ids (padding has prob 0).

    ``ids``/``probs``: [B, L, K]; ``tail_mass``: [B, L] probability not covered (top-k), or None
    when ``probs`` are an unbiased estimate of the whole distribution (sampled)."""

    ids: torch.Tensor
    probs: torch.Tensor
    tail_mass: torch.Tensor | None = None


@dataclass
class DenseTargets:
    logprobs: torch.Tensor  # [B, L, V]


def _flat(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    return arr.flatten().to_numpy(zero_copy_only=False, writable=True)


def _pad_segments(values: list[np.ndarray], lengths: np.ndarray, fill: list[float]) -> list[np.ndarray]:
    """Scatter concatenated variable-length segments into a [segments, max_len] grid."""
    n = len(lengths)
    width = int(lengths.max()) if n else 0
    row = np.repeat(np.arange(n), lengths)
    col = _offsets_within(lengths)
    out = []
    for v, f in zip(values, fill):
        grid = np.full((n, width), f, dtype=v.dtype)
        grid[row, col] = v
        out.append(grid)
    return out


def batch_input_ids(batch: pa.Table) -> torch.Tensor:
    seq_len = len(batch.column("input_ids")[0])
    return torch.from_numpy(_flat(batch.column("input_ids")).astype(np.int64).reshape(batch.num_rows, seq_len))


def _offsets_within(lengths: np.ndarray) -> np.ndarray:
    """For concatenated segments of ``lengths``: each element's offset inside its segment."""
    return np.arange(int(lengths.sum())) - np.repeat(idcodec.segment_starts(lengths), lengths)


def _select_draw(lengths: np.ndarray, draws: int, draw: int) -> tuple[np.ndarray, np.ndarray]:
    """For segments stored position-major with ``draws`` per position: the flat indices of
    draw ``draw``'s elements, and those segments' lengths."""
    starts = idcodec.segment_starts(lengths).reshape(-1, draws)[:, draw]
    chosen = lengths.reshape(-1, draws)[:, draw]
    return np.repeat(starts, chosen) + _offsets_within(chosen), chosen


def _merge_segments(a_len: np.ndarray, b_len: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Where two per-position segment lists land when each position's ``a`` segment is followed
    by its ``b`` segment: (indices of a's elements, indices of b's elements, merged lengths)."""
    total = a_len + b_len
    starts = idcodec.segment_starts(total)

    return (
        np.repeat(starts, a_len) + _offsets_within(a_len),
        np.repeat(starts + a_len, b_len) + _offsets_within(b_len),
        total,
    )


def batch_targets(
    batch: pa.Table, manifest: Manifest, order: np.ndarray, epoch: int = 0, temperature: float | None = None
) -> SparseTargets | DenseTargets:
    """Rebuild the teacher's per-position distribution from a batch of stored rows.

    ``order`` is the cache's rank table (:func:`load_rank_order`), needed to decode ids. With
    several draws per position (``targets.draws``), epoch e reads draw e mod draws. A ``full``
    cache holds the whole distribution, so it can be re-tempered exactly to another
    ``temperature`` (log p_T' = log_softmax(log p_T * T / T')); the sparse kinds hold draws or
    ids chosen at the capture temperature and are returned at it."""
    b, seq_len = batch.num_rows, manifest.dataset.seq_len
    kind = manifest.targets.kind
    if kind == "sampled":
        lengths = _flat(batch.column("target_lengths")).astype(np.int64)
        raw_ids = idcodec.decode(_flat(batch.column("target_ids")), lengths, order)
        counts = _flat(batch.column("target_counts")).astype(np.float32)
        if manifest.targets.draws > 1:
            picked, lengths = _select_draw(lengths, manifest.targets.draws, epoch % manifest.targets.draws)
            raw_ids, counts = raw_ids[picked], counts[picked]
        ids, counts = _pad_segments([raw_ids, counts], lengths, [0, 0.0])
        probs = counts / float(manifest.targets.num_samples)
        return SparseTargets(
            torch.from_numpy(ids.astype(np.int64)).view(b, seq_len, -1), torch.from_numpy(probs).view(b, seq_len, -1)
        )
    if kind == "stratified":
        k, positions = manifest.targets.k, b * seq_len
        head_len = np.full(positions, k, dtype=np.int64)
        tail_len = _flat(batch.column("tail_lengths")).astype(np.int64)
        tail_mass = _flat(batch.column("tail_mass")).astype(np.float32)
        at_head, at_tail, total = _merge_segments(head_len, tail_len)
        ids = np.empty(int(total.sum()), dtype=np.int64)
        probs = np.empty(int(total.sum()), dtype=np.float32)
        ids[at_head] = idcodec.decode(_flat(batch.column("target_ids")), head_len, order)
        probs[at_head] = np.exp(_flat(batch.column("target_logprobs")))
        ids[at_tail] = idcodec.decode(_flat(batch.column("tail_ids")), tail_len, order)
        probs[at_tail] = _flat(batch.column("tail_counts")).astype(np.float32) * np.repeat(
            tail_mass / manifest.targets.num_samples, tail_len
        )
        ids, probs = _pad_segments([ids, probs], total, [0, 0.0])
        return SparseTargets(  # head exact + weighted tail draws: an estimate of the whole distribution
            torch.from_numpy(ids.astype(np.int64)).view(b, seq_len, -1), torch.from_numpy(probs).view(b, seq_len, -1)
        )
    if kind == "topk":
        k = manifest.targets.k
        lengths = np.full(b * seq_len, k, dtype=np.int64)
        ids = idcodec.decode(_flat(batch.column("target_ids")), lengths, order).reshape(b, seq_len, k)
        probs = np.exp(_flat(batch.column("target_logprobs"))).reshape(b, seq_len, k)
        tail = _flat(batch.column("tail_mass")).reshape(b, seq_len)
        return SparseTargets(torch.from_numpy(ids), torch.from_numpy(probs.astype(np.float32)), torch.from_numpy(tail))
    if kind == "full":
        v = manifest.tokenizer.vocab_size
        logprobs = torch.from_numpy(_flat(batch.column("target_logprobs")).reshape(b, seq_len, v))
        captured = manifest.targets.temperature
        if temperature is not None and abs(temperature - captured) > 1e-12:
            logprobs = torch.log_softmax(logprobs.double() * (captured / temperature), dim=-1).float()
        return DenseTargets(logprobs)
    raise CacheFormatError(f"unknown target kind {kind!r}")
