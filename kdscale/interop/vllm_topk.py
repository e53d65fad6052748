"""Top-k log-prob rows as vLLM's ``prompt_logprobs`` returns them, or in axolotl's parallel-list
layout: JSONL (``*.jsonl``) or Parquet (``*.parquet``) files, one row per sequence.

Accepted shapes (``L`` = len(input_ids); the ids column may also be named ``prompt_token_ids``):

- ``prompt_logprobs``: a list of L entries; entry 0 is ``null`` (vLLM has no distribution for
  the first token) and entry i maps token ids to log-probs of token i given tokens 0..i-1:
  ``{"791": -0.12, "13": -2.5}``, or ``{"791": {"logprob": -0.12, "rank": 1, ...}}`` (vLLM's
  ``Logprob`` objects serialised), or, from Parquet, a map<int, float> or a list of
  ``{token_id, logprob}`` structs. vLLM adds the prompt's own token to an entry when it is not
  in the top k, so entries hold k or k + 1 items: every position keeps its k most likely
  (k = the fewest any position holds).
- ``target_token_ids`` + ``target_logprobs``: per position, k ids and their k log-probs. With
  L entries whose first is empty or null they align like ``prompt_logprobs``; otherwise entry p
  describes token p + 1 (L - 1 entries for capture output, L for packed rows).

Log-probs are at T = 1 and normalised over the whole vocabulary (what vLLM returns); the
uncovered mass becomes the kdscale tail mass.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import numpy as np

from kdscale import fs
from kdscale.interop.rows import SourceError, SourceRow

SUFFIXES = (".jsonl", ".parquet")


def source_files(uri: str) -> list[str]:
    """The file itself, or the folder's ``*.jsonl`` / ``*.parquet`` files in name order."""
    if fs.is_file(uri):
        return [fs.normalize(uri)]
    if not fs.exists(uri):
        raise SourceError(f"{uri} does not exist")
    files = [fs.join(uri, f) for f in fs.listdir(uri) if f.endswith(SUFFIXES)]
    if not files:
        raise SourceError(f"{uri} holds no *.jsonl or *.parquet file")
    return files


def _records(uri: str) -> Iterator[dict[str, Any]]:
    if uri.endswith(".parquet"):
        import pyarrow.parquet as pq

        fsys, path = fs.filesystem(uri)
        with fsys.open(path, "rb") as f:
            for batch in pq.ParquetFile(f).iter_batches(batch_size=64):
                yield from batch.to_pylist()
        return
    fsys, path = fs.filesystem(uri)
    with fsys.open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as e:
                    raise SourceError(f"{uri} line {n}: not JSON ({e.msg})") from None


def _entry(entry: Any) -> list[tuple[int, float]]:
    """One position's (id, log-prob) pairs from any accepted encoding."""
    if entry is None:
        return []
    if isinstance(entry, dict):
        items = list(entry.items())
    else:  # Parquet map -> [(key, value)], or a list of {token_id, logprob} structs
        items = [(e["token_id"], e["logprob"]) if isinstance(e, dict) else tuple(e) for e in entry]
    return [(int(k), float(v["logprob"] if isinstance(v, dict) else v)) for k, v in items]


def _ids(record: dict[str, Any], where: str) -> np.ndarray:
    ids = record.get("input_ids", record.get("prompt_token_ids"))
    if ids is None:
        raise SourceError(f"{where}: no input_ids (or prompt_token_ids) field")
    return np.asarray(ids, dtype=np.int64)


def _positions(record: dict[str, Any], length: int, where: str) -> list[list[tuple[int, float]]]:
    """Per kdscale position (predicting token p + 1), the (id, log-prob) pairs."""
    if "prompt_logprobs" in record:
        entries = [_entry(e) for e in record["prompt_logprobs"]]
        if len(entries) != length or entries[:1] != [[]]:
            raise SourceError(f"{where}: prompt_logprobs needs {length} entries, the first null ({len(entries)} given)")
        return entries[1:]
    if "target_token_ids" in record and "target_logprobs" in record:
        ids, lps = record["target_token_ids"], record["target_logprobs"]
        if len(ids) != len(lps):
            raise SourceError(f"{where}: {len(ids)} target_token_ids entries but {len(lps)} target_logprobs")
        pairs = [list(zip(map(int, i or []), map(float, lp or []))) for i, lp in zip(ids, lps)]
        if any(len(i or []) != len(lp or []) for i, lp in zip(ids, lps)):
            raise SourceError(f"{where}: a position has different numbers of ids and log-probs")
        prompt_aligned = len(pairs) == length and pairs[:1] == [[]]
        return pairs[1:] if prompt_aligned else pairs
    raise SourceError(f"{where}: neither prompt_logprobs nor target_token_ids + target_logprobs")


def _top(pairs: list[tuple[int, float]], k: int) -> tuple[list[int], list[float]]:
    ranked = sorted(pairs, key=lambda p: (-p[1], p[0]))[:k]
    return [i for i, _ in ranked], [lp for _, lp in ranked]


def read_rows(uri: str, k: int | None = None) -> Iterator[SourceRow]:
    """Every row of every file, positions cut to their ``k`` most likely ids (default: every
    position's own count, which must then be the same everywhere — see :func:`min_k`)."""
    for file in source_files(uri):
        for n, record in enumerate(_records(file)):
            where = f"{file} row {n}"
            input_ids = _ids(record, where)
            positions = _positions(record, len(input_ids), where)
            width = k if k is not None else min((len(p) for p in positions), default=0)
            if any(len(p) < width for p in positions) or width < 1:
                raise SourceError(f"{where}: a position holds fewer than k={width} log-probs")
            top = [_top(p, width) for p in positions]
            ids = np.asarray([t[0] for t in top], dtype=np.int64).reshape(len(top), width)
            lps = np.asarray([t[1] for t in top], dtype=np.float32).reshape(len(top), width)
            mask = record.get("attention_mask")
            yield SourceRow(file, n, input_ids, ids, lps, None if mask is None else np.asarray(mask))


def min_k(uri: str) -> int:
    """The fewest (id, log-prob) pairs any position of the source holds: the cache's k."""
    fewest = None
    for file in source_files(uri):
        for n, record in enumerate(_records(file)):
            where = f"{file} row {n}"
            counts = [len(p) for p in _positions(record, len(_ids(record, where)), where)]
            if counts:
                fewest = min(counts) if fewest is None else min(fewest, min(counts))
    if not fewest:
        raise SourceError(f"{uri}: no position holds any log-prob")
    return fewest


def write_rows(dest: str, rows: Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> int:
    """Export one JSONL file: a line per (input_ids [L], ids [L, k], log-probs [L, k]) in the
    parallel-list layout, entry p describing token p + 1 (L entries: the last predicts the token
    after the row). Log-probs are the shortest decimals that read back to the same float32, so a
    re-import stores the same bytes of targets."""
    written = 0
    with fs.open_for_write(dest) as f:  # line by line: a shard's JSONL is never held whole
        for tokens, ids, logprobs in rows:
            line = {
                "input_ids": tokens.tolist(),
                "target_token_ids": ids.tolist(),
                "target_logprobs": [[float(_shortest(v)) for v in pos] for pos in logprobs],
            }
            f.write((json.dumps(line, separators=(",", ":")) + "\n").encode())
            written += 1
    return written


def _shortest(value: np.floating) -> str:
    return np.format_float_positional(np.float32(value), unique=True, trim="-")
