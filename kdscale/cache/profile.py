"""What a committed cache holds, in numbers a person reads: the manifest's summary (``cache
inspect``, MLflow lineage) and per-position statistics from a sample of rows (the cache profile
plot). Reads the manifest and at most a few shards; never the whole cache."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from kdscale.cache.format import Manifest
from kdscale.cache.kinds import kind as target_kind
from kdscale.cache.reader import read_split
from kdscale.cache.segments import flat


def describe(m: Manifest) -> dict[str, Any]:
    """Every field a user asks about a cache: kind and parameters, size, fingerprints, provenance."""
    t = m.totals
    return {
        "cache_id": m.cache_id,
        "format_version": m.format_version,
        "kind": m.targets.kind,
        "params": {k: v for k, v in m.targets.model_dump().items() if v is not None and k != "kind"},
        "rows": t["rows"],
        "tokens": t["tokens"],
        "bytes": t["bytes"],
        "bytes_per_token": t["bytes_per_token"],
        "target_bytes_per_token": t["target_bytes_per_token"],
        "mean_ids_per_position": t["mean_ids_per_position"],
        "mean_tail_mass": t["mean_tail_mass"],
        "teacher_heldout_ce": t["teacher_heldout_ce"],
        "shards": len(m.shards),
        "rows_by_split": m.dataset.rows,
        "seq_len": m.dataset.seq_len,
        "task": m.dataset.task,
        "teacher": {"name": m.teacher.name, "fingerprint": m.teacher.fingerprint, "dtype": m.teacher.dtype},
        "tokenizer": m.tokenizer.model_dump(),
        "id_coding": m.id_coding["scheme"],
        "dataset_content_hash": m.dataset.content_hash,
        "corpus": {"patterns": m.dataset.patterns, "documents": m.dataset.documents, "sources": len(m.dataset.sources)},
        "units": _units(m),
        "created_at": m.created_at,
        "kdscale_version": m.kdscale_version,
    }


def _units(m: Manifest) -> dict[str, Any] | None:
    """Input units (format 2 text caches): how many, their sizes, and the packing tails dropped."""
    units = m.dataset.units
    if units is None:
        return None
    tokens = [u.tokens for u in units]
    return {
        "count": len(units),
        "files": len({p["uri"] for u in units for p in u.pieces}),
        "tokens_min": min(tokens),
        "tokens_max": max(tokens),
        "dropped_tokens": m.dataset.dropped_tokens,
        "dataset_identity": m.dataset.identity,
    }


@dataclass
class Profile:
    ids_per_position: np.ndarray  # stored ids at each sampled position
    tail_mass: np.ndarray | None  # top-k only: probability outside the stored ids
    teacher_nll_per_token: np.ndarray  # per sampled row


def profile(cache_uri: str, m: Manifest, max_rows: int = 256) -> Profile:
    """Statistics over the first ``max_rows`` training rows."""
    table = read_split(cache_uri, m, "train", max_rows)
    positions = table.num_rows * m.dataset.seq_len
    kind = target_kind(m.targets.kind)
    ids = kind.ids_per_position(table, m, positions)
    tail = flat(table.column("tail_mass")).astype(np.float64) if kind.has_tail_mass else None
    nll = table.column("teacher_nll").to_numpy().astype(np.float64) / max(m.dataset.labelled_per_row(), 1)
    return Profile(ids, tail, nll)
