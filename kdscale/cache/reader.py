"""Reading a cache: manifest checks (committed? our format? our tokenizer?), checksums, and
turning stored columns back into target tensors for the loss."""

from __future__ import annotations

import hashlib
import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from kdscale import fs
from kdscale.cache.format import (
    ID_CODING_SCHEME,
    LEDGER_DIR,
    MANIFEST,
    READABLE_VERSIONS,
    CacheFormatError,
    Manifest,
)
from kdscale.cache.segments import flat
from kdscale.targets import DenseTargets, SparseTargets  # noqa: F401  # re-exported for readers of targets


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
    if version not in READABLE_VERSIONS:
        readable = ", ".join(map(str, READABLE_VERSIONS))
        raise CacheFormatError(
            f"{cache_uri}: cache format_version {version!r} is not supported by this kdscale (reads {readable})"
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


def _read_table(cache_uri: str, name: str, sha256: str) -> pa.Table:
    """A side table of the cache (rank table, token bytes), refused unless it matches the manifest's sha256."""
    data = fs.read_bytes(fs.join(cache_uri, name))
    if hashlib.sha256(data).hexdigest() != sha256:
        raise CacheFormatError(f"corrupted cache: {name} does not match its sha256 in the manifest")
    return pq.read_table(io.BytesIO(data))


def load_rank_order(cache_uri: str, manifest: Manifest) -> np.ndarray:
    """The id-coding rank table (``order[rank] = token id``), checked against its sha256."""
    coding = manifest.id_coding
    if coding.get("scheme") != ID_CODING_SCHEME:
        raise CacheFormatError(f"{cache_uri}: unknown id coding {coding.get('scheme')!r}")
    order = _read_table(cache_uri, coding["rank_file"], coding["sha256"]).column("token_id").to_numpy()
    if len(order) != manifest.tokenizer.vocab_size:
        raise CacheFormatError(
            f"{cache_uri}: rank table has {len(order)} entries, vocab is {manifest.tokenizer.vocab_size}"
        )
    return order.astype(np.int64)


def load_token_bytes(cache_uri: str, manifest: Manifest):
    """The teacher vocabulary's bytes (:class:`kdscale.data.alignment.TokenBytes`), checked
    against the manifest's sha256 and digest; a cache without them cannot serve a student with
    its own tokenizer, and the error says so."""
    from kdscale.data.alignment import TokenBytes

    info = manifest.alignment
    if not info:
        raise CacheFormatError(
            f"the cache {manifest.cache_id} at {cache_uri} holds no token bytes (it was made before kdscale aligned "
            "tokenizers, or its teacher tokenizer's bytes cannot be recovered exactly), so it cannot serve a "
            "student with its own tokenizer: precompute the cache again with this kdscale, or give the student "
            "the teacher's tokenizer"
        )
    table = TokenBytes.from_arrow(_read_table(cache_uri, info["token_bytes"], info["sha256"]))
    if len(table) != manifest.tokenizer.vocab_size or table.digest() != info["digest"]:
        raise CacheFormatError(
            f"{cache_uri}: {info['token_bytes']} holds {len(table)} tokens (digest {table.digest()[:12]}), the "
            f"manifest says vocab {manifest.tokenizer.vocab_size} (digest {str(info['digest'])[:12]})"
        )
    return table


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


def batch_input_ids(batch: pa.Table) -> torch.Tensor:
    seq_len = len(batch.column("input_ids")[0])
    return torch.from_numpy(flat(batch.column("input_ids")).astype(np.int64).reshape(batch.num_rows, seq_len))


def batch_targets(
    batch: pa.Table, manifest: Manifest, order: np.ndarray, epoch: int = 0, temperature: float | None = None
) -> SparseTargets | DenseTargets:
    """Rebuild the teacher's per-position distribution from a batch of stored rows.

    ``order`` is the cache's rank table (:func:`load_rank_order`), needed to decode ids. With
    several draws per position (``targets.draws``), epoch e reads draw e mod draws. A ``full``
    cache holds the whole distribution, so it can be re-tempered exactly to another
    ``temperature`` (log p_T' = log_softmax(log p_T * T / T')); the sparse kinds hold draws or
    ids chosen at the capture temperature and are returned at it."""
    from kdscale.cache.kinds import kind

    return kind(manifest.targets.kind).decode(batch, manifest, order, epoch, temperature)
