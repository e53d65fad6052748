"""Students trained at once (kdscale.parallel_students, kdscale.resources.room_for): who may start
beside whom, the listed order, failures and interrupts, on stand-in trainings that block until
the test lets them finish. The real thing (two Ray Train runs at once) is in test_students."""

from __future__ import annotations

import threading
import time

import pytest

from kdscale.config import StudentSpec, TrainSpec
from kdscale.parallel_students import train_students
from kdscale.resources import Capacity, Demand, most_at_once, room_for, student_demand

TWO_CPUS = Capacity(cpus=2, gpus=0, node_cpus=2, node_gpus=0, where="this machine (local Ray)")
FOUR_GPUS = Capacity(cpus=32, gpus=4, node_cpus=16, node_gpus=2, where="the Ray cluster")


def student(name: str, **train) -> StudentSpec:
    return StudentSpec(name=name, train=TrainSpec(**train))


def test_demand_is_the_workers_cpus_and_gpus():
    assert student_demand(student("s", num_workers=2, cpus_per_worker=0.5)) == Demand(1.0, 0.0)
    assert student_demand(student("s", num_workers=2, cpus_per_worker=4, use_gpu=True)) == Demand(8.0, 2.0)


def test_room_keeps_a_cpu_for_reading_and_counts_gpus():
    half = Demand(0.5, 0)
    assert room_for([], Demand(8, 4), TWO_CPUS, None)  # alone, always (checked before any work)
    assert room_for([half], half, TWO_CPUS, None)  # 1 CPU of workers + 1 for Ray Data
    assert not room_for([half, half], half, TWO_CPUS, None)
    assert not room_for([Demand(1, 0)], Demand(1, 0), TWO_CPUS, None)  # would starve the reads
    assert not room_for([half], half, TWO_CPUS, limit=1)
    gpu = Demand(2, 1)
    assert room_for([gpu, gpu, gpu], gpu, FOUR_GPUS, None)
    assert not room_for([gpu, gpu, gpu, gpu], gpu, FOUR_GPUS, None)  # no fifth GPU
    assert not room_for([gpu, gpu], gpu, FOUR_GPUS, limit=2)


def test_most_at_once_follows_the_listed_order():
    half, whole = Demand(0.5, 0), Demand(1, 0)
    assert most_at_once([half, half, half], TWO_CPUS, None) == 2
    assert most_at_once([whole, whole], TWO_CPUS, None) == 1
    assert most_at_once([whole, half, half], TWO_CPUS, None) == 2
    assert most_at_once([half, half, half], TWO_CPUS, limit=1) == 1
    assert most_at_once([Demand(2, 1)] * 6, FOUR_GPUS, None) == 4


class Trainings:
    """Stand-in trainings: each records when it started and blocks until released (or fails)."""

    def __init__(self, fail: tuple[str, ...] = ()):
        self.fail = fail
        self.started: list[str] = []
        self.release = {name: threading.Event() for name in "abcde"}
        self.lock = threading.Lock()

    def __call__(self, s: StudentSpec) -> str:
        with self.lock:
            self.started.append(s.name)
        assert self.release[s.name].wait(10), f"{s.name} never released"
        if s.name in self.fail:
            raise RuntimeError(f"{s.name} failed")
        return f"trained {s.name}"

    def wait_started(self, count: int) -> list[str]:
        deadline = time.monotonic() + 10
        while len(self.started) < count and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.1)  # and no more than that
        return list(self.started)


def at_most(n: int):
    return lambda running, s: len(running) < n


def run_in_thread(fn) -> tuple[threading.Thread, dict]:
    out: dict = {}

    def target() -> None:
        try:
            out["result"] = fn()
        except BaseException as e:
            out["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, out


def test_students_start_in_order_as_room_frees_and_results_keep_the_listed_order():
    students = [student(n) for n in "abcd"]
    t = Trainings()
    thread, out = run_in_thread(lambda: train_students(students, t, at_most(2)))
    assert t.wait_started(2) == ["a", "b"]
    t.release["b"].set()  # b ends first: c takes its place, d still waits
    assert t.wait_started(3) == ["a", "b", "c"]
    for name in "acd":
        t.release[name].set()
    thread.join(10)
    assert list(out["result"]) == ["a", "b", "c", "d"]
    assert out["result"]["c"] == "trained c"


def test_a_failure_stops_new_students_lets_running_ones_finish_and_is_raised():
    students = [student(n) for n in "abc"]
    t = Trainings(fail=("a",))
    finished: list[str] = []

    def train(s: StudentSpec) -> str:
        result = t(s)
        finished.append(s.name)
        return result

    thread, out = run_in_thread(lambda: train_students(students, train, at_most(2)))
    assert t.wait_started(2) == ["a", "b"]
    t.release["a"].set()  # a fails while b trains
    time.sleep(0.3)
    assert t.started == ["a", "b"]  # c is not started after a failure
    assert thread.is_alive()  # b's training is not abandoned
    t.release["b"].set()
    thread.join(10)
    assert finished == ["b"]
    assert str(out["error"]) == "a failed"


def test_one_at_a_time_is_the_old_serial_order():
    students = [student(n) for n in "abc"]
    t = Trainings()
    for name in "abc":
        t.release[name].set()
    assert train_students(students, t, at_most(1)) == {n: f"trained {n}" for n in "abc"}
    assert t.started == ["a", "b", "c"]


def test_an_interrupted_driver_abandons_the_students_in_flight():
    students = [student(n) for n in "abc"]
    t = Trainings()
    abandoned: list[str] = []

    def may_start(running, s):
        if len(running) == 2:  # both training: the user presses Ctrl-C
            raise KeyboardInterrupt
        return True

    with pytest.raises(KeyboardInterrupt):
        train_students(students, t, may_start, abandon=lambda s: abandoned.append(s.name))
    assert abandoned == ["a", "b"]
    for event in t.release.values():
        event.set()
