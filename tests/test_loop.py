"""The training loop's pieces that need no Ray: the prefetcher that reads ahead across epochs."""

from __future__ import annotations

import threading
import time

import pytest

from kdscale.student.loop import _Prefetcher


def _epochs(log: list):
    def make_epoch(epoch: int):
        for i in range(3):
            log.append((threading.current_thread().name, epoch, i))
            yield epoch, i
    return make_epoch


@pytest.mark.parametrize("depth", [0, 1, 4])
def test_prefetcher_gives_each_epoch_its_items_in_order(depth):
    log: list = []
    p = _Prefetcher(_epochs(log), range(2, 5), depth)
    assert [list(p.epoch(e)) for e in range(2, 5)] == [[(e, i) for i in range(3)] for e in range(2, 5)]
    threads = {name for name, _, _ in log}
    assert threads == ({"kdscale-prefetch"} if depth else {threading.current_thread().name})


def test_prefetcher_reads_the_next_epoch_while_this_one_trains():
    log: list = []
    p = _Prefetcher(_epochs(log), range(2), 4)
    first = p.epoch(0)
    next(first)
    deadline = time.time() + 5
    while len(log) < 6 and time.time() < deadline:  # 3 items + end of epoch 0, then epoch 1 begins
        time.sleep(0.01)
    assert (("kdscale-prefetch", 1, 0)) in log  # epoch 1's first read happened during epoch 0
    assert list(first) == [(0, 1), (0, 2)] and list(p.epoch(1)) == [(1, 0), (1, 1), (1, 2)]


def test_prefetcher_raises_the_readers_error_in_the_training_thread():
    def broken(epoch: int):
        yield 1
        raise OSError("shard unreadable")

    p = _Prefetcher(broken, range(1), 2)
    with pytest.raises(OSError, match="shard unreadable"):
        list(p.epoch(0))
