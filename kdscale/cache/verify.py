"""Whether a cache may be used: the one check every path that reads a cache goes through
(``kdscale run`` reusing a cache, ``train``, ``eval``, ``cache inspect`` and ``cache verify``).

A manifest is not trusted as written. Its ``cache_id`` is recomputed from its own fields; shard
paths must be the plain names the writer gives (so no record can point outside the cache, e.g.
at ``/etc/hostname`` with that file's real sha256); row counts and totals must equal the sums of
its shard records (a ``rows.train`` of 10^12 once sized the LR schedule so that training never
left warmup); and each shard's Parquet footer must agree with its record and with the kind and
``seq_len`` the manifest claims. Those checks read footers only. ``checksums`` adds the sha256 of
every file (a full read) and a decode of the first rows' targets (ids in the vocabulary, sampled
counts summing to N), which catches an edit that recomputed the cache_id to match.
"""

from __future__ import annotations

import math

import numpy as np
import pyarrow.parquet as pq

from kdscale import fs
from kdscale.cache import idcodec
from kdscale.cache.format import SPLITS, TOKEN_BYTES_FILE, CacheFormatError, Manifest, shard_name
from kdscale.cache.kinds import kind as target_kind
from kdscale.cache.reader import batch_targets, load_rank_order, open_manifest
from kdscale.cache.writer import manifest_totals, present_splits, shard_columns
from kdscale.fingerprint import cache_id as make_cache_id

MAX_LISTED = 20  # problems shown in one error; the rest are counted


def open_cache(cache_uri: str, *, checksums: bool, tokenizer: tuple[str, int] | None = None) -> Manifest:
    """The committed manifest of a cache that passed every check, or one :class:`CacheFormatError`
    listing every problem. ``tokenizer``: (fingerprint, vocab size) the reader will use."""
    from kdscale.cache.reader import check_tokenizer

    manifest, found = problems(cache_uri, checksums)
    if found:
        shown = "\n".join(f"  - {p}" for p in found[:MAX_LISTED])
        more = f"\n  ... and {len(found) - MAX_LISTED} more" if len(found) > MAX_LISTED else ""
        raise CacheFormatError(
            f"refusing the cache at {cache_uri} ({len(found)} problem{'s' * (len(found) > 1)}; "
            f"recompute it with `kdscale precompute` into an empty folder):\n{shown}{more}"
        )
    if tokenizer is not None:
        check_tokenizer(manifest, *tokenizer)
    return manifest


def problems(cache_uri: str, checksums: bool = True) -> tuple[Manifest, list[str]]:
    """The manifest (raises :class:`CacheFormatError` if it cannot be read at all) and every problem found."""
    manifest = open_manifest(cache_uri)
    listing = _shard_list_problems(manifest) + _identity_problems(manifest)
    if any(p.startswith(("shard path", "rank file", "no ", "the manifest lists")) for p in listing):
        return manifest, listing  # never open paths a manifest should not name, nor look for missing splits
    found = listing + _sum_problems(manifest) + _unit_problems(manifest) + file_problems(cache_uri, manifest, checksums)
    if checksums and not found:
        found = content_problems(cache_uri, manifest)
    return manifest, found


# The manifest alone --------------------------------------------------------------------------


def _identity_problems(m: Manifest) -> list[str]:
    found = []
    expected = make_cache_id(
        m.teacher.fingerprint, m.tokenizer.fingerprint, m.dataset.fingerprint, m.targets.params(), m.format_version
    )
    if m.cache_id != expected:
        found.append(
            f"cache_id {m.cache_id} is not the one its teacher, tokenizer, data and targets give ({expected}): "
            "the manifest was edited"
        )
    t, kind = m.targets, target_kind(m.targets.kind)
    for name, needed in (("num_samples", kind.uses_num_samples), ("k", kind.uses_k)):
        value = getattr(t, name)
        if needed != (value is not None) or (value is not None and value < 1):
            found.append(f"targets.{name} is {value!r}, which kind {t.kind} does not allow")
    if t.draws < 1 or (t.draws > 1 and not kind.supports_draws):
        found.append(f"targets.draws is {t.draws}, kind {t.kind}")
    if not (t.temperature > 0 and math.isfinite(t.temperature)):
        found.append(f"targets.temperature is {t.temperature}")
    if m.tokenizer.vocab_size < 1 or m.tokenizer.logit_width < m.tokenizer.vocab_size:
        found.append(f"tokenizer vocab_size {m.tokenizer.vocab_size} / logit_width {m.tokenizer.logit_width}")
    if m.dataset.seq_len < (2 if m.dataset.task_name == "causal_lm" else 1):
        found.append(f"dataset.seq_len is {m.dataset.seq_len}")
    if m.id_coding.get("rank_file") != idcodec.RANK_FILE:
        found.append(f"rank file {m.id_coding.get('rank_file')!r} is not {idcodec.RANK_FILE!r}")
    return found


def _shard_list_problems(m: Manifest) -> list[str]:
    found = []
    if not m.shards:
        return ["the manifest lists no shards"]
    for s in m.shards:
        if s.path != shard_name(s.split, s.index):
            found.append(
                f"shard path {s.path!r} is not the plain name {shard_name(s.split, s.index)!r} its split "
                "and index give (a shard must be a file inside the cache)"
            )
    for split in SPLITS:
        indexes = sorted(s.index for s in m.shards_of(split))
        if indexes != list(range(len(indexes))):
            found.append(f"{split} shards are numbered {indexes}, not 0..{len(indexes) - 1}")
    for split in ("train", "heldout"):
        if not m.shards_of(split):
            found.append(f"no {split} shards")
    return found


def _sum_problems(m: Manifest) -> list[str]:
    found = []
    per_row = m.dataset.seq_len if m.dataset.task_name == "causal_lm" else 1
    for s in m.shards:
        if s.rows < 1 or s.tokens != s.rows * per_row:
            found.append(f"shard {s.path}: {s.tokens} tokens for {s.rows} rows of {per_row}")
    rows = {split: sum(s.rows for s in m.shards_of(split)) for split in present_splits(list(m.shards))}
    if m.dataset.rows != rows:
        found.append(f"dataset.rows {m.dataset.rows} are not the shards' rows {rows}")
    columns = {
        split: shard_columns(m.targets.kind, split, m.targets.store_logprobs, m.dataset.task_name) for split in rows
    }
    if m.columns != columns:
        found.append(f"columns {m.columns} are not those of kind {m.targets.kind}: {columns}")
    totals = manifest_totals(m.targets, m.dataset, list(m.shards))
    for key, value in totals.items():
        recorded = m.totals.get(key)
        same = (recorded is None and value is None) or (
            isinstance(recorded, (int, float))
            and value is not None
            and math.isclose(recorded, value, rel_tol=1e-9, abs_tol=1e-9)
        )
        if not same:
            found.append(f"totals.{key} is {recorded!r}; its shards sum to {value!r}")
    return found


def _unit_problems(m: Manifest) -> list[str]:
    """v2: the units account for every row and shard, and their hashes give the content hash."""
    from kdscale.data.units import units_hash

    units, d = m.dataset.units, m.dataset
    if units is None:  # format 1, images, or rows packed by the caller (tests, benchmarks)
        return []
    found = []
    if d.identity is None:
        found.append("dataset.units without dataset.identity")
    if [u.index for u in units] != list(range(len(units))):
        found.append("dataset.units are not numbered 0..n-1 in order")
    if units_hash(u.content_hash for u in units) != d.content_hash:
        found.append("dataset.content_hash is not the hash of its units' content hashes")
    rows = {split: sum(u.rows.get(split, 0) for u in units) for split in d.rows}
    if rows != d.rows:
        found.append(f"dataset.rows {d.rows} are not its units' rows {rows}")
    listed = [name for u in units for name in u.shards]
    if sorted(listed) != sorted(s.path for s in m.shards):
        found.append("the units' shards are not the manifest's shards (each shard belongs to exactly one unit)")
    if sum(u.dropped_tokens for u in units) != d.dropped_tokens:
        found.append(f"dataset.dropped_tokens {d.dropped_tokens} is not its units' sum")
    return found


# The files -----------------------------------------------------------------------------------


def file_problems(cache_uri: str, m: Manifest, checksums: bool) -> list[str]:
    """Missing, resized, (``checksums``) altered files, and shards whose Parquet footer disagrees."""
    found = []
    rank_uri = fs.join(cache_uri, m.id_coding["rank_file"])
    if not fs.exists(rank_uri):
        found.append(f"{m.id_coding['rank_file']} is missing")
    elif checksums and fs.sha256(rank_uri) != m.id_coding.get("sha256"):
        found.append(f"{m.id_coding['rank_file']} does not match its sha256 in the manifest")
    found += _token_bytes_problems(cache_uri, m, checksums)
    for s in m.shards:
        uri = fs.join(cache_uri, s.path)
        if not fs.exists(uri):
            found.append(f"shard {s.path} is missing")
            continue
        size = fs.size(uri)
        if size != s.bytes:
            found.append(f"shard {s.path} has {size} bytes, the manifest says {s.bytes}")
        elif checksums and fs.sha256(uri) != s.sha256:
            found.append(f"shard {s.path} does not match its sha256 in the manifest (corrupted)")
        else:
            found += footer_problems(uri, m, s)
    return found


def _token_bytes_problems(cache_uri: str, m: Manifest, checksums: bool) -> list[str]:
    """The alignment table, where the manifest names one: the expected name, present, unaltered."""
    if not m.alignment:
        return []
    name = m.alignment.get("token_bytes")
    if name != TOKEN_BYTES_FILE:
        return [f"token bytes file {name!r} is not {TOKEN_BYTES_FILE!r}"]
    uri = fs.join(cache_uri, name)
    if not fs.exists(uri):
        return [f"{name} is missing"]
    if checksums and fs.sha256(uri) != m.alignment.get("sha256"):
        return [f"{name} does not match its sha256 in the manifest"]
    return []


def _leaf_counts(meta) -> dict[str, int]:
    counts: dict[str, int] = {}
    for rg in range(meta.num_row_groups):
        group = meta.row_group(rg)
        for c in range(group.num_columns):
            col = group.column(c)
            name = col.path_in_schema.split(".")[0]
            counts[name] = counts.get(name, 0) + col.num_values
    return counts


def expected_leaf_counts(m: Manifest, rows: int) -> dict[str, int]:
    """Values each fixed-size column holds for ``rows`` rows of this manifest's kind and seq_len."""
    t, positions = m.targets, rows * (m.dataset.seq_len if m.dataset.task_name == "causal_lm" else 1)
    counts = {"seq_id": rows, "teacher_nll": rows}
    if m.dataset.task_name == "causal_lm":
        counts["input_ids"] = positions
    else:
        counts["labels"] = rows
    counts.update(target_kind(t.kind).leaf_counts(t, positions, m.tokenizer.vocab_size))
    return counts


def footer_problems(uri: str, m: Manifest, record) -> list[str]:
    """A shard's Parquet footer against its record: rows, columns, and value counts of the
    columns whose size the kind and seq_len fix."""
    fsys, path = fs.filesystem(uri)
    try:
        with fsys.open(path, "rb") as f:
            meta = pq.ParquetFile(f).metadata
    except Exception as e:  # pyarrow raises several types for a broken footer
        return [f"shard {record.path} is not a readable Parquet file ({type(e).__name__}: {str(e)[:120]})"]
    found = []
    if meta.num_rows != record.rows:
        found.append(f"shard {record.path} holds {meta.num_rows} rows, the manifest says {record.rows}")
    names = [meta.schema.column(i).path.split(".")[0] for i in range(meta.num_columns)]
    expected = m.columns.get(record.split, [])
    if list(dict.fromkeys(names)) != list(expected):
        found.append(f"shard {record.path} has columns {list(dict.fromkeys(names))}, the manifest says {expected}")
        return found
    leaves = _leaf_counts(meta)
    for column, want in expected_leaf_counts(m, record.rows).items():
        if column in leaves and leaves[column] != want:
            found.append(
                f"shard {record.path}: column {column} holds {leaves[column]} values; {record.rows} rows of "
                f"kind {m.targets.kind}, seq_len {m.dataset.seq_len} need {want}"
            )
    return found


def content_problems(cache_uri: str, m: Manifest, rows: int = 4) -> list[str]:
    """Decode the first rows of the first training shard: ids inside the vocabulary, finite
    probabilities, and what the kind itself can check (sampled: draw counts that sum to N)."""
    uri = fs.join(cache_uri, m.shards_of("train")[0].path)
    fsys, path = fs.filesystem(uri)
    with fsys.open(path, "rb") as f:
        table = pq.ParquetFile(f).read_row_group(0).slice(0, rows)
    try:
        order = load_rank_order(cache_uri, m)
        targets = batch_targets(table, m, order)
    except (CacheFormatError, ValueError, IndexError) as e:
        return [f"the first rows of {m.shards_of('train')[0].path} do not decode as kind {m.targets.kind}: {e}"]
    found = []
    probs = targets.probs if hasattr(targets, "probs") else targets.logprobs.exp()
    if not bool(np.isfinite(probs.numpy()).all()):
        found.append("non-finite teacher probabilities in the first training rows")
    if hasattr(targets, "ids") and (int(targets.ids.min()) < 0 or int(targets.ids.max()) >= m.tokenizer.vocab_size):
        found.append(f"target ids outside the vocabulary [0, {m.tokenizer.vocab_size})")
    return found + target_kind(m.targets.kind).content_problems(table, m)
