"""The rank-delta id coding round-trips and keeps companion columns aligned."""

from __future__ import annotations

import numpy as np

from kdscale.cache import idcodec
from kdscale.cache.writer import code_ids


def test_round_trip_with_empty_and_single_segments():
    rng = np.random.default_rng(0)
    vocab = 300
    order = idcodec.rank_table(rng.integers(0, vocab, 5000), vocab)
    rank = idcodec.inverse(order)
    lengths = np.array([3, 0, 1, 7, 0, 2])
    ids = np.concatenate([rng.choice(vocab, n, replace=False) for n in lengths]).astype(np.int32)
    deltas, perm = idcodec.encode(ids, lengths, rank)
    assert (deltas >= 0).all()
    decoded = idcodec.decode(deltas, lengths, order)
    np.testing.assert_array_equal(decoded, ids[perm])
    starts = idcodec.segment_starts(lengths)
    for s, n in zip(starts, lengths):  # same set per position, and ranks ascending
        assert set(decoded[s : s + n]) == set(ids[s : s + n])
        assert np.all(np.diff(rank[decoded[s : s + n]]) > 0)


def test_rank_table_orders_by_frequency():
    order = idcodec.rank_table(np.array([5, 5, 5, 2, 2, 9]), 10)
    assert list(order[:3]) == [5, 2, 9]
    assert sorted(order) == list(range(10))


def test_code_ids_permutes_companions():
    rank = idcodec.inverse(np.arange(10)[::-1].astype(np.int32))  # rank = 9 - id
    row = {
        "input_ids": np.zeros(2, dtype=np.int32),
        "target_ids": np.array([1, 4, 7, 2], dtype=np.int32),
        "target_lengths": np.array([3, 1], dtype=np.uint8),
        "target_counts": np.array([10, 20, 30, 50], dtype=np.uint8),
    }
    coded = code_ids(row, "sampled", rank)
    decoded = idcodec.decode(coded["target_ids"], row["target_lengths"], np.arange(10)[::-1])
    assert list(decoded) == [7, 4, 1, 2]
    assert list(coded["target_counts"]) == [30, 20, 10, 50]
