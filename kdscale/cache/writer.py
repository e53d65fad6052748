"""Writing a cache: Parquet shards (each one object, written whole), a ledger entry per finished
shard, and the manifest last — the commit. Readers treat a folder without a manifest as an
unfinished cache."""

from __future__ import annotations

import hashlib
import io
import os
import time
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from kdscale import __version__, fs
from kdscale.cache import idcodec
from kdscale.cache.format import (
    EVAL_SPLITS,
    FORMAT_VERSION,
    HELDOUT_EXTRA_COLUMNS,
    ID_CODING_SCHEME,
    LEDGER_DIR,
    MANIFEST,
    PLAN,
    SPLITS,
    TOKEN_BYTES_FILE,
    CacheFormatError,
    DatasetInfo,
    Manifest,
    ShardRecord,
    Split,
    TargetsInfo,
    TeacherInfo,
    TokenizerInfo,
    UnitRecord,
    base_columns,
    target_columns,
)
from kdscale.cache.kinds import kind as target_kind
from kdscale.processes import alive, host

DEFAULT_ZSTD_LEVEL = 9
ROWS_PER_ROW_GROUP = 32
# Columns whose values are small integers (uint8 is stored as INT32 in Parquet) or floats with
# noisy low bytes: splitting the byte streams lets zstd find the mostly-zero high bytes. On the
# quickstart cache (sampled N=50) this took the whole shard from 36.2 to 26.8 bytes/token
# (ids 25.2 -> 20.0 with rank-delta coding, counts 6.6 -> 4.8, lengths 1.0 -> 0.7).
BYTE_STREAM_SPLIT_COLUMNS = (
    "target_ids",
    "target_counts",
    "target_lengths",
    "target_logprobs",
    "tail_mass",
    "teacher_nll",
    "tail_ids",
    "tail_counts",
    "tail_lengths",
)

_ARROW_TYPES: dict[str, pa.DataType] = {
    "seq_id": pa.string(),
    "input_ids": pa.list_(pa.int32()),
    "pixels": pa.list_(pa.uint8()),
    "labels": pa.list_(pa.int32()),
    "teacher_nll": pa.float32(),
    "target_ids": pa.list_(pa.int32()),
    "target_counts": pa.list_(pa.uint8()),
    "target_lengths": pa.list_(pa.uint8()),
    "target_logprobs": pa.list_(pa.float32()),
    "tail_mass": pa.list_(pa.float32()),
    "tail_ids": pa.list_(pa.int32()),
    "tail_counts": pa.list_(pa.uint8()),
    "tail_lengths": pa.list_(pa.uint8()),
    "teacher_top1": pa.list_(pa.int32()),
}


def shard_columns(kind: str, split: str, store_logprobs: bool = False, task: str = "causal_lm") -> list[str]:
    extra = HELDOUT_EXTRA_COLUMNS if split in EVAL_SPLITS else ()
    return [*base_columns(task), *target_columns(kind, store_logprobs), *extra]


def shard_schema(kind: str, split: str, store_logprobs: bool = False, task: str = "causal_lm") -> pa.Schema:
    return pa.schema([(c, _ARROW_TYPES[c]) for c in shard_columns(kind, split, store_logprobs, task)])


def row_positions(row: dict[str, Any]) -> int:
    """Predicted positions in a row: its tokens (causal LM) or its one label (image)."""
    return len(row["labels"]) if "labels" in row else len(row["input_ids"])


def _list_array(arrays: list[np.ndarray], typ: pa.DataType) -> pa.Array:
    """A list<T> column from per-row numpy arrays without a Python loop over elements."""
    offsets = np.zeros(len(arrays) + 1, dtype=np.int32)
    np.cumsum([len(a) for a in arrays], out=offsets[1:])
    values = np.concatenate(arrays) if arrays else np.zeros(0)
    return pa.ListArray.from_arrays(
        pa.array(offsets), pa.array(values.astype(typ.value_type.to_pandas_dtype(), copy=False))
    )


def code_ids(row: dict[str, Any], kind: str, rank: np.ndarray) -> dict[str, Any]:
    """Replace a row's raw target ids by their rank-delta code (companions permuted alike)."""
    if "target_ids" not in row:
        return row
    return dict(row, **target_kind(kind).code(row, row_positions(row), rank))


def rows_to_table(
    rows: list[dict[str, Any]], kind: str, split: str, store_logprobs: bool = False, task: str = "causal_lm"
) -> pa.Table:
    schema = shard_schema(kind, split, store_logprobs, task)
    columns = []
    for name in schema.names:
        typ = schema.field(name).type
        values = [r[name] for r in rows]
        columns.append(_list_array(values, typ) if pa.types.is_list(typ) else pa.array(values, type=typ))
    return pa.Table.from_arrays(columns, schema=schema)


def _leaf(table: pa.Table, column: str) -> str:
    """Parquet encodings are set on leaf columns: a list's values live at ``<name>.list.element``
    (pyarrow silently ignores the bare name for a list column)."""
    return f"{column}.list.element" if pa.types.is_list(table.schema.field(column).type) else column


def encode_shard(table: pa.Table, compression_level: int = DEFAULT_ZSTD_LEVEL) -> bytes:
    """Parquet bytes: zstd, no dictionaries (ids and floats are high-cardinality), byte-stream
    split where it helps, page CRCs so a flipped byte fails the read instead of training on
    garbage, and small row groups for streaming reads."""
    buf = io.BytesIO()
    pq.write_table(
        table,
        buf,
        compression="zstd",
        compression_level=compression_level,
        use_dictionary=False,
        column_encoding={
            _leaf(table, c): "BYTE_STREAM_SPLIT" for c in BYTE_STREAM_SPLIT_COLUMNS if c in table.column_names
        },
        write_page_checksum=True,
        row_group_size=ROWS_PER_ROW_GROUP,
        write_statistics=False,
    )
    return buf.getvalue()


def target_bytes(data: bytes, kind: str, store_logprobs: bool = False) -> int:
    meta = pq.ParquetFile(io.BytesIO(data)).metadata
    wanted = set(target_columns(kind, store_logprobs))
    total = 0
    for rg in range(meta.num_row_groups):
        group = meta.row_group(rg)
        for c in range(group.num_columns):
            col = group.column(c)
            if col.path_in_schema.split(".")[0] in wanted:
                total += col.total_compressed_size
    return total


def write_shard(
    cache_uri: str,
    name: str,
    split: Split,
    index: int,
    rows: list[dict[str, Any]],
    targets: TargetsInfo,
    rank: np.ndarray,
    compression_level: int = DEFAULT_ZSTD_LEVEL,
    task: str = "causal_lm",
) -> ShardRecord:
    """Code, encode and write one shard whole; return its ledger record (size and sha256 of the
    bytes actually written, computed from memory without re-reading)."""
    kind = targets.kind
    table = rows_to_table([code_ids(r, kind, rank) for r in rows], kind, split, targets.store_logprobs, task)
    data = encode_shard(table, compression_level)
    fs.write_bytes(fs.join(cache_uri, name), data)
    if "target_ids" in table.column_names:
        lengths = [len(r["target_ids"]) + len(r.get("tail_ids", ())) for r in rows]
    else:  # full: every id of the vocabulary at every position
        lengths = [len(r["target_logprobs"]) for r in rows]
    return ShardRecord(
        path=name,
        split=split,
        index=index,
        rows=len(rows),
        tokens=int(sum(row_positions(r) for r in rows)),
        bytes=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        target_bytes=target_bytes(data, kind, targets.store_logprobs),
        unique_ids=int(sum(lengths)),
        tail_mass_sum=float(sum(float(np.sum(r["tail_mass"])) for r in rows))
        if "tail_mass" in table.column_names
        else 0.0,
        teacher_nll_sum=float(sum(r["teacher_nll"] for r in rows)),
    )


# Ledger ----------------------------------------------------------------------------------------


def ledger_uri(cache_uri: str, name: str) -> str:
    return fs.join(cache_uri, LEDGER_DIR, name.replace(".parquet", ".json"))


def write_ledger_entry(cache_uri: str, record: ShardRecord) -> None:
    fs.write_json(ledger_uri(cache_uri, record.path), record.model_dump())
    renew_lease(cache_uri)


UNITS_DIR = "units"


def unit_ledger_uri(cache_uri: str, index: int) -> str:
    return fs.join(cache_uri, LEDGER_DIR, UNITS_DIR, f"u{index:06d}.json")


def write_unit_entry(cache_uri: str, record: UnitRecord) -> None:
    """A unit is packed: its rows, shards and content hash, so a rerun can check that re-reading
    it gives the same rows (a file changed in between is refused, not mixed in)."""
    fs.write_json(unit_ledger_uri(cache_uri, record.index), record.model_dump())


def recorded_units(cache_uri: str) -> dict[int, UnitRecord]:
    folder = fs.join(cache_uri, LEDGER_DIR, UNITS_DIR)
    if not fs.exists(folder):
        return {}
    units = {}
    for entry in fs.listdir(folder):
        if entry.endswith(".json"):
            record = UnitRecord.model_validate(fs.read_json(fs.join(folder, entry)))
            units[record.index] = record
    return units


def check_claim(cache_uri: str, cache_id: str) -> bool:
    """Whether an unfinished cache folder is already claimed for ``cache_id``; refuses one begun
    for another job (reads only)."""
    plan_uri = fs.join(cache_uri, LEDGER_DIR, PLAN)
    if not fs.exists(plan_uri):
        return False
    try:
        existing = fs.read_json(plan_uri).get("cache_id")
    except (ValueError, AttributeError):
        existing = "<unreadable>"
    if existing != cache_id:
        raise CacheFormatError(
            f"{cache_uri} holds an unfinished cache for another job (cache_id {existing}, this job "
            f"{cache_id}); delete it or choose another cache URI"
        )
    return True


def start_or_check_plan(cache_uri: str, cache_id: str) -> None:
    """Claim an unfinished cache folder for ``cache_id``, or refuse one begun for another job."""
    if not check_claim(cache_uri, cache_id):
        fs.write_json(fs.join(cache_uri, LEDGER_DIR, PLAN), {"cache_id": cache_id, "format_version": FORMAT_VERSION})


LEASE = "lease.json"
LEASE_SECONDS = 900.0  # another host's lease older than this is taken over (its precompute is presumed dead)


def acquire_lease(cache_uri: str) -> None:
    """Claim the right to compute an unfinished cache, so two precomputes started on one cache do
    not both do all the teacher work; refuses while another live precompute holds it. A lease of
    a dead process on this host, or one not renewed for LEASE_SECONDS, is taken over. (Two
    starting in the same instant can both win: object stores have no atomic create.)"""
    uri = fs.join(cache_uri, LEDGER_DIR, LEASE)
    if fs.exists(uri):
        try:
            held = fs.read_json(uri)
        except ValueError:
            held = {}
        if _lease_live(held):
            raise CacheFormatError(
                f"another precompute (pid {held.get('pid')} on {held.get('host')}) is computing the cache at "
                f"{cache_uri}; wait for it to commit (a rerun then reuses the cache), or stop it"
            )
    renew_lease(cache_uri)


def renew_lease(cache_uri: str) -> None:
    fs.write_json(
        fs.join(cache_uri, LEDGER_DIR, LEASE),
        {"host": host(), "pid": os.getpid(), "renewed": time.time()},
    )


def release_lease(cache_uri: str) -> None:
    fs.remove(fs.join(cache_uri, LEDGER_DIR, LEASE))


def _lease_live(held: dict[str, Any]) -> bool:
    if held.get("host") == host():
        return held.get("pid") != os.getpid() and alive(held.get("pid"))
    return time.time() - float(held.get("renewed", 0)) < LEASE_SECONDS


def _write_table(cache_uri: str, name: str, table: pa.Table) -> str:
    """A side table of the cache (one object, written whole); returns the sha256 the manifest records."""
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    data = buf.getvalue()
    fs.write_bytes(fs.join(cache_uri, name), data)
    return hashlib.sha256(data).hexdigest()


def write_rank_file(cache_uri: str, order: np.ndarray) -> dict[str, Any]:
    """Store the id-coding rank table (before any shard); returns the manifest's ``id_coding``."""
    sha = _write_table(cache_uri, idcodec.RANK_FILE, pa.table({"token_id": pa.array(order, type=pa.int32())}))
    return {"scheme": ID_CODING_SCHEME, "rank_file": idcodec.RANK_FILE, "sha256": sha}


def write_token_bytes(cache_uri: str, token_bytes) -> dict[str, Any]:
    """Store the teacher vocabulary's bytes (a :class:`kdscale.data.alignment.TokenBytes`);
    returns the manifest's ``alignment``."""
    sha = _write_table(cache_uri, TOKEN_BYTES_FILE, token_bytes.to_arrow())
    return {"token_bytes": TOKEN_BYTES_FILE, "sha256": sha, "digest": token_bytes.digest()}


def finished_shards(cache_uri: str, verify: bool = True) -> dict[str, ShardRecord]:
    """Ledger entries whose shard is present with the recorded size and checksum."""
    done: dict[str, ShardRecord] = {}
    for entry in fs.listdir(fs.join(cache_uri, LEDGER_DIR)):
        if entry in (PLAN, LEASE) or not entry.endswith(".json"):
            continue
        record = ShardRecord.model_validate(fs.read_json(fs.join(cache_uri, LEDGER_DIR, entry)))
        shard = fs.join(cache_uri, record.path)
        if not fs.exists(shard) or fs.size(shard) != record.bytes:
            continue
        if verify and fs.sha256(shard) != record.sha256:
            continue
        done[record.path] = record
    return done


# Manifest --------------------------------------------------------------------------------------


def build_manifest(
    *,
    cache_id: str,
    targets: TargetsInfo,
    teacher: TeacherInfo,
    tokenizer: TokenizerInfo,
    dataset: DatasetInfo,
    id_coding: dict[str, Any],
    shards: list[ShardRecord],
    alignment: dict[str, Any] | None = None,
) -> Manifest:
    shards = sorted(shards, key=lambda s: (SPLITS.index(s.split), s.index))
    splits = present_splits(shards)
    return Manifest(
        format_version=FORMAT_VERSION,
        cache_id=cache_id,
        kdscale_version=__version__,
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        targets=targets,
        teacher=teacher,
        tokenizer=tokenizer,
        dataset=dataset,
        columns={
            split: shard_columns(targets.kind, split, targets.store_logprobs, dataset.task_name) for split in splits
        },
        id_coding=id_coding,
        shards=shards,
        totals=manifest_totals(targets, dataset, shards),
        alignment=alignment,
    )


def present_splits(shards: list[ShardRecord]) -> list[str]:
    """The splits a manifest lists columns for: train and heldout always, validation when it has shards."""
    return [split for split in SPLITS if split != "validation" or any(s.split == split for s in shards)]


def manifest_totals(targets: TargetsInfo, dataset: DatasetInfo, shards: list[ShardRecord]) -> dict[str, Any]:
    """The manifest's ``totals``: sums over its shard records (readers recompute and compare them)."""
    tokens = sum(s.tokens for s in shards)
    total_bytes = sum(s.bytes for s in shards)
    tgt_bytes = sum(s.target_bytes for s in shards)

    def teacher_ce(split: str) -> float | None:
        scored = [s for s in shards if s.split == split]
        positions = sum(s.rows * dataset.labelled_per_row() for s in scored)
        return sum(s.teacher_nll_sum for s in scored) / positions if positions else None

    return {
        "rows": sum(s.rows for s in shards),
        "tokens": tokens,
        "bytes": total_bytes,
        "target_bytes": tgt_bytes,
        "bytes_per_token": total_bytes / tokens if tokens else 0.0,
        "target_bytes_per_token": tgt_bytes / tokens if tokens else 0.0,
        "mean_ids_per_position": sum(s.unique_ids for s in shards) / tokens if tokens else 0.0,
        "mean_tail_mass": sum(s.tail_mass_sum for s in shards) / tokens
        if target_kind(targets.kind).has_tail_mass and tokens
        else None,
        "teacher_heldout_ce": teacher_ce("heldout"),
        **({"teacher_validation_ce": teacher_ce("validation")} if "validation" in present_splits(shards) else {}),
    }


def commit(cache_uri: str, manifest: Manifest) -> None:
    """Write the manifest: from this moment the cache exists for readers."""
    fs.write_json(fs.join(cache_uri, MANIFEST), manifest.model_dump(mode="json"))
