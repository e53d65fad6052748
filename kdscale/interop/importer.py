"""``kdscale cache import``: another tool's teacher outputs as a verified, lineage-keyed kdscale
``topk`` cache; and ``kdscale cache export``, the other direction.

Two passes over the source. The first checks every row (ids inside the tokenizer's vocabulary,
alignment, the bit streams decode) and hashes what the cache will hold, so a bad source is
refused before anything is written and the cache_id is known up front. The second writes the
shards through :class:`kdscale.cache.store.CacheWriter` (shards first, ledger per shard,
manifest last), so an interrupted import resumes where it stopped.

Identity is content: the cache_id covers the rows (token ids, split) and their targets with each
position's pairs in id order, plus the teacher name, the tokenizer and k — not the source's
bytes, so the same targets imported from DistillKit's Parquet or from a vLLM JSONL export of
them name the same cache. The source's files, their sizes and sha256 and its config are kept
in the manifest as provenance (``teacher.source.imported``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from kdscale import fs
from kdscale.cache.format import (
    FORMAT_VERSION,
    SPLITS,
    DatasetInfo,
    Manifest,
    Split,
    TargetsInfo,
    TeacherInfo,
    TokenizerInfo,
)
from kdscale.interop.rows import Quality, SourceError, SourceRow, cache_row, check_values, sequences, windows

FORMATS = ("distillkit", "vllm-topk")
ROWS_PER_SHARD = 256
TEACHER_NLL_NOTE = (
    "estimated from the stored top-k: exact where the next token is among the k ids, else the tail mass "
    "spread uniformly over the ids not stored"
)


class ImportSettings(BaseModel):
    """How another tool's rows become kdscale rows (part of the cache's identity)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    teacher_name: str | None = Field(None, description="Recorded as the cache's teacher (default imported-<format>).")
    seq_len: int = Field(256, ge=2, description="Positions per kdscale row; longer sequences are cut into rows.")
    heldout_fraction: float = Field(0.1, gt=0, lt=1, description="Rows held out, by content hash.")
    validation_fraction: float = Field(0.0, ge=0, lt=1, description="Rows kept for validation, by content hash.")


@dataclass
class Source:
    """An opened source: its files, its config (provenance), k and the rows."""

    fmt: str
    uri: str
    files: list[str]
    config: dict[str, Any]
    k: int
    rows: Callable[[], Iterator[SourceRow]]
    vocab_problem: Callable[[int], str | None] = lambda vocab: None
    extra_files: list[str] = field(default_factory=list)


def open_source(fmt: str, uri: str) -> Source:
    uri = fs.normalize(uri)
    if fmt == "distillkit":
        from kdscale.interop import distillkit as dk

        cfg = dk.load_config(uri)

        def vocab_problem(vocab: int) -> str | None:
            # DistillKit's capture sets d = max(len(vocab) + 1, max id): one above the vocabulary
            if vocab <= cfg.d <= vocab + 1:
                return None
            return f"the tokenizer has {vocab} ids but the source's d is {cfg.d} (expected {vocab} or {vocab + 1})"

        return Source(
            fmt,
            uri,
            dk.source_files(uri),
            cfg.model_dump(mode="json"),
            cfg.k,
            lambda: dk.read_rows(uri, cfg),  # type: ignore[arg-type,return-value]
            vocab_problem,
            [fs.join(uri, "compression_config.yaml")],
        )
    if fmt == "vllm-topk":
        from kdscale.interop import vllm_topk as vt

        k = vt.min_k(uri)
        return Source(fmt, uri, vt.source_files(uri), {"k": k}, k, lambda: vt.read_rows(uri, k))
    raise SourceError(f"unknown import format {fmt!r} (known: {', '.join(FORMATS)})")


def load_tokenizer_at(path: str):
    """A tokenizer from an HF folder or a GGUF file (as a teacher's is found)."""
    from kdscale.config import TeacherSpec
    from kdscale.teachers import load_tokenizer

    if path.endswith(".gguf"):
        folder, _, name = path.rpartition("/")
        spec = TeacherSpec(name="import", path=folder or ".", gguf_file=name)
    else:
        spec = TeacherSpec(name="import", path=path)
    return load_tokenizer(spec)


@dataclass
class Converted:
    """What pass 1 learns: every row checked, the content hashed, the id-coding sample counted."""

    quality: Quality
    rows: dict[str, int]
    content_hash: str
    token_counts: np.ndarray


def _converted(source: Source, vocab: int, seq_len: int, fractions: tuple[float, float], quality: Quality):
    """(split, kdscale row) for every window of the source, in source order; ``quality`` counts."""
    for row in source.rows():
        check_values(row, vocab)
        quality.source_rows += 1
        for seq in sequences(row):
            quality.sequences += 1
            quality.dropped_positions += len(seq.tokens) % seq_len
            for w in windows(seq, seq_len):
                split, out, mass = cache_row(w, vocab, fractions)
                quality.add(w, mass)
                yield split, out


def _target_digest(row: dict) -> bytes:
    """Each position's (id, log-prob) pairs in id order: the order a source lists them in (by
    log-prob, by rank) does not change what the cache holds."""
    ids = row["target_ids"].reshape(len(row["input_ids"]), -1)
    lps = row["target_logprobs"].reshape(ids.shape)
    order = np.argsort(ids, axis=1, kind="stable")
    picked = np.take_along_axis(ids, order, 1).astype("<i4").tobytes()
    return picked + np.take_along_axis(lps, order, 1).astype("<f4").tobytes()


def check_source(source: Source, vocab: int, seq_len: int, fractions: tuple[float, float]) -> Converted:
    """Pass 1: every row checked and hashed; nothing written. The id-coding rank table counts
    the first rows up to a precompute's sample size (kdscale.precompute.feed.RANK_SAMPLE_TOKENS)."""
    from kdscale.precompute.feed import RANK_SAMPLE_TOKENS

    hashes = {split: hashlib.sha256(split.encode()) for split in SPLITS}
    rows = dict.fromkeys(SPLITS, 0)
    counts = np.zeros(vocab, dtype=np.int64)
    sampled = 0
    quality = Quality()
    for split, row in _converted(source, vocab, seq_len, fractions, quality):
        hashes[split].update(row["seq_id"].encode() + _target_digest(row))
        rows[split] += 1
        if sampled < RANK_SAMPLE_TOKENS:
            counts += np.bincount(row["input_ids"], minlength=vocab)
            sampled += len(row["input_ids"])
    if not sum(rows.values()):
        raise SourceError(f"{source.uri}: no sequence has {seq_len} positions (--seq-len)")
    if not rows["heldout"] or not rows["train"]:
        raise SourceError(
            f"{source.uri}: {rows['train']} training and {rows['heldout']} held-out rows of {seq_len} positions; "
            "students need both (--heldout-fraction, --seq-len)"
        )
    total = hashlib.sha256(b"import")
    for split in SPLITS:
        total.update(hashes[split].hexdigest().encode())
    return Converted(quality, {split: n for split, n in rows.items() if n}, total.hexdigest(), counts)


@dataclass
class ImportResult:
    cache_uri: str
    manifest: Manifest
    reused: bool
    quality: dict[str, Any]


def import_cache(src: str, dest: str, fmt: str, tokenizer_path: str, settings: ImportSettings) -> ImportResult:
    """Import ``src`` (format ``fmt``) into a kdscale ``topk`` cache at ``dest``."""
    from kdscale.cache import idcodec
    from kdscale.fingerprint import cache_id as make_cache_id
    from kdscale.fingerprint import digest, tokenizer_fingerprint
    from kdscale.precompute.runner import existing_cache

    seq_len, fractions = settings.seq_len, (settings.heldout_fraction, settings.validation_fraction)
    source = open_source(fmt, src)
    tokenizer = load_tokenizer_at(tokenizer_path)
    vocab = len(tokenizer)
    problem = source.vocab_problem(vocab)
    if problem:
        raise SourceError(f"{source.uri}: {problem}: is {tokenizer_path} the teacher's tokenizer?")
    if source.k > vocab:
        raise SourceError(f"{source.uri}: k={source.k} exceeds the tokenizer's vocabulary of {vocab}")
    checked = check_source(source, vocab, seq_len, fractions)
    name = settings.teacher_name or f"imported-{fmt}"
    targets = TargetsInfo(kind="topk", temperature=1.0, k=source.k, seed=0)
    teacher_fp = digest({"imported": fmt, "teacher": name})
    tokenizer_fp = tokenizer_fingerprint(tokenizer)
    cache_id = make_cache_id(teacher_fp, tokenizer_fp, checked.content_hash, targets.params(), FORMAT_VERSION)
    dest = fs.normalize(dest)
    found = existing_cache(dest, cache_id, checksums=True)
    if found is not None:
        return ImportResult(dest, found, True, checked.quality.summary())
    teacher = TeacherInfo(
        name=name,
        fingerprint=teacher_fp,
        dtype="unknown",
        source={"imported": _provenance(source, checked, tokenizer_path)},
        parallelism={},
    )
    tokenizer_info = TokenizerInfo(
        fingerprint=tokenizer_fp,
        vocab_size=vocab,
        logit_width=max(vocab, int(source.config.get("d", vocab))),
        eos_token_id=tokenizer.eos_token_id,
    )
    dataset = DatasetInfo(
        sources=[_shown(f) for f in source.files],
        patterns=[_shown(source.uri)],
        documents=checked.quality.sequences,
        content_hash=checked.content_hash,
        seq_len=seq_len,
        heldout_fraction=settings.heldout_fraction,
        validation_fraction=settings.validation_fraction,
        rows=checked.rows,
        tokens=sum(checked.rows.values()) * seq_len,
        dropped_tokens=checked.quality.dropped_positions,
    )
    rank_order = idcodec.rank_from_counts(checked.token_counts, vocab)
    from kdscale.data.alignment import exact_token_bytes

    info = {"targets": targets, "teacher": teacher, "tokenizer": tokenizer_info, "dataset": dataset}
    tables = (rank_order, exact_token_bytes(tokenizer))
    manifest = _write(source, dest, cache_id, tables, (vocab, seq_len, fractions), info)
    return ImportResult(dest, manifest, False, checked.quality.summary())


Packing = tuple[int, int, tuple[float, float]]  # vocabulary, seq_len, (held-out, validation) fractions


def _write(source: Source, dest: str, cache_id: str, tables: tuple, packing: Packing, info: dict) -> Manifest:
    """Pass 2: write the shards (skipping those a killed import finished), then commit.
    ``tables``: the id-coding rank order and the vocabulary's bytes (None: not recoverable)."""
    from kdscale.cache import idcodec
    from kdscale.cache.format import shard_name
    from kdscale.cache.store import CacheWriter
    from kdscale.cache.writer import write_shard

    rank_order, token_bytes = tables
    rank = idcodec.inverse(rank_order)
    buffers: dict[Split, list[dict]] = {split: [] for split in SPLITS}
    written: dict[Split, int] = dict.fromkeys(SPLITS, 0)
    with CacheWriter(dest, cache_id, rank_order, token_bytes) as cache:

        def flush(split: Split) -> None:
            name = shard_name(split, written[split])
            if name not in cache.finished:
                cache.record(write_shard(dest, name, split, written[split], buffers[split], info["targets"], rank))
            written[split] += 1
            buffers[split] = []

        for split, row in _converted(source, *packing, Quality()):
            buffers[split].append(row)
            if len(buffers[split]) == ROWS_PER_SHARD:
                flush(split)
        for split in SPLITS:
            if buffers[split]:
                flush(split)
        order = [shard_name(split, i) for split in SPLITS for i in range(written[split])]
        manifest, _ = cache.commit(order=order, **info)
    return manifest


def _shown(uri: str) -> str:
    from kdscale.tracking.redact import redact_text

    return redact_text(uri)


def _provenance(source: Source, checked: Converted, tokenizer_path: str) -> dict[str, Any]:
    files = [{"uri": _shown(f), "bytes": fs.size(f), "sha256": fs.sha256(f)} for f in source.files + source.extra_files]
    return {
        "format": source.fmt,
        "uri": _shown(source.uri),
        "config": source.config,
        "files": files,
        "tokenizer": _shown(tokenizer_path),
        "quality": checked.quality.summary(),
        "temperature": "log-probs at T = 1, normalised over the whole vocabulary (as the source stores them)",
        "teacher_nll": TEACHER_NLL_NOTE,
    }


# Export -----------------------------------------------------------------------------------------


def export_cache(cache_uri: str, dest: str, fmt: str = "vllm-topk") -> dict[str, int]:
    """A kdscale ``topk`` or ``stratified`` cache's top-k ids and log-probs as vLLM-topk JSONL,
    one file per shard (``<shard>.jsonl``); rows per split."""
    from kdscale.cache import idcodec, segments
    from kdscale.cache.reader import load_rank_order
    from kdscale.cache.store import LogitCache
    from kdscale.interop import vllm_topk

    if fmt != "vllm-topk":
        raise SourceError(f"export supports --format vllm-topk, not {fmt!r}")
    cache = LogitCache.open(cache_uri)
    m = cache.manifest
    if m.targets.kind not in ("topk", "stratified") or m.dataset.task_name != "causal_lm":
        raise SourceError(
            f"{cache_uri} is a {m.targets.kind} cache of {m.dataset.task_name}: export needs topk or stratified text"
        )
    if m.targets.temperature != 1.0:
        raise SourceError(f"{cache_uri} stores log-probs at T={m.targets.temperature}; vLLM-topk holds T = 1")
    order = load_rank_order(cache_uri, m)
    k, seq_len = int(m.targets.k or 0), m.dataset.seq_len
    written: dict[str, int] = dict.fromkeys(SPLITS, 0)
    for shard in m.shards:
        table = _read_shard(cache_uri, shard.path)
        n = table.num_rows
        ids = idcodec.decode(segments.flat(table.column("target_ids")), np.full(n * seq_len, k), order)
        lps = segments.flat(table.column("target_logprobs"))
        tokens = np.asarray(segments.flat(table.column("input_ids"))).reshape(n, seq_len)
        rows = zip(tokens, ids.reshape(n, seq_len, k), lps.reshape(n, seq_len, k))
        written[shard.split] += vllm_topk.write_rows(fs.join(dest, shard.path.replace(".parquet", ".jsonl")), rows)
    return written


def _read_shard(cache_uri: str, name: str):
    import pyarrow.parquet as pq

    fsys, path = fs.filesystem(fs.join(cache_uri, name))
    with fsys.open(path, "rb") as f:
        return pq.read_table(f, columns=["input_ids", "target_ids", "target_logprobs"])
