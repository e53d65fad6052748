"""Variable-length per-position segments stored concatenated (a row's ids of every position in one
list column): where each element sits, how to select or merge segments, how to pad them into a grid."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from kdscale.cache import idcodec


def flat(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """The values of a list column, all rows concatenated."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    return arr.flatten().to_numpy(zero_copy_only=False, writable=True)


def offsets_within(lengths: np.ndarray) -> np.ndarray:
    """For concatenated segments of ``lengths``: each element's offset inside its segment."""
    return np.arange(int(lengths.sum())) - np.repeat(idcodec.segment_starts(lengths), lengths)


def pad_segments(values: list[np.ndarray], lengths: np.ndarray, fill: list[float]) -> list[np.ndarray]:
    """Scatter concatenated variable-length segments into a [segments, max_len] grid."""
    n = len(lengths)
    width = int(lengths.max()) if n else 0
    row = np.repeat(np.arange(n), lengths)
    col = offsets_within(lengths)
    out = []
    for v, f in zip(values, fill):
        grid = np.full((n, width), f, dtype=v.dtype)
        grid[row, col] = v
        out.append(grid)
    return out


def select_draw(lengths: np.ndarray, draws: int, draw: int) -> tuple[np.ndarray, np.ndarray]:
    """For segments stored position-major with ``draws`` per position: the flat indices of
    draw ``draw``'s elements, and those segments' lengths."""
    starts = idcodec.segment_starts(lengths).reshape(-1, draws)[:, draw]
    chosen = lengths.reshape(-1, draws)[:, draw]
    return np.repeat(starts, chosen) + offsets_within(chosen), chosen


def merge_segments(a_len: np.ndarray, b_len: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Where two per-position segment lists land when each position's ``a`` segment is followed
    by its ``b`` segment: (indices of a's elements, indices of b's elements, merged lengths)."""
    total = a_len + b_len
    starts = idcodec.segment_starts(total)
    return (
        np.repeat(starts, a_len) + offsets_within(a_len),
        np.repeat(starts + a_len, b_len) + offsets_within(b_len),
        total,
    )


def code(row: dict, ids_col: str, lengths: np.ndarray, companions: tuple[str, ...], rank: np.ndarray) -> dict:
    """Rank-delta code one id column of a row (companion columns permuted alike)."""
    deltas, perm = idcodec.encode(row[ids_col], lengths, rank)
    return {ids_col: deltas, **{c: row[c][perm] for c in companions if c in row}}
