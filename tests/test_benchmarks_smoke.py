"""Every benchmark's ``--smoke`` mode (benchmarks/common.py): the benchmark's own code path on
jobs/tiny.yaml's random teacher and student (or a synthetic stand-in of its data set), a few
tokens, 1 epoch, output in a temp folder. Each must print its one JSON line with the keys the real
run prints and finite numbers, and leave docs/ alone.

The benchmarks are called in this process (``main(argv)``), so the ones on Ray reuse the
session's Ray runtime (``ray_session``) instead of starting one per benchmark; loss_memory's arms
are subprocesses by design."""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
import sys
from pathlib import Path
from types import ModuleType

import pytest

from tests.conftest import sqlite_store

REPO = Path(__file__).resolve().parent.parent
BENCHMARKS = REPO / "benchmarks"
DOCS = REPO / "docs"


def benchmark(name: str) -> ModuleType:
    """benchmarks/<name>.py as a module (benchmarks/ on sys.path, as when it runs as a script)."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # (dataclasses look their module up there)
    spec.loader.exec_module(module)
    return module


def json_line(capsys, name: str, *argv: str) -> dict:
    """Run the benchmark's main with ``argv`` and parse the last line it printed."""
    benchmark(name).main(list(argv))
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines, f"{name} printed nothing"
    return json.loads(lines[-1])


def numbers(value, where: str = ""):
    """(path, number) for every number in a parsed JSON value."""
    if isinstance(value, dict):
        for key, v in value.items():
            yield from numbers(v, f"{where}.{key}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from numbers(v, f"{where}[{i}]")
    elif isinstance(value, (int, float)):
        yield where, value


def check(line: dict, keys: set[str]) -> None:
    """The line has every key of the real run's line, and no number in it is NaN or infinite."""
    assert keys <= line.keys(), f"missing {sorted(keys - line.keys())}"
    bad = [(where, v) for where, v in numbers(line) if not math.isfinite(v)]
    assert not bad, f"non-finite numbers: {bad}"


def docs_state() -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in DOCS.rglob("*") if p.is_file()}


@pytest.fixture(autouse=True)
def docs_untouched():
    """No smoke run writes to docs/ (the report goes to a temp folder)."""
    before = docs_state()
    yield
    assert docs_state() == before


@pytest.fixture(scope="module")
def bench_mlflow(tmp_path_factory):
    """One MLflow sqlite store for the module's pipeline runs (a new store per test costs its migrations)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", sqlite_store(tmp_path_factory.mktemp("bench-mlflow")))
        yield


@pytest.fixture(scope="module", autouse=True)
def shared_smoke_caches(tmp_path_factory):
    """The training benchmarks' smoke runs share their tiny teacher pass (benchmarks/common.py)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KDSCALE_SMOKE_CACHES", str(tmp_path_factory.mktemp("smoke-caches")))
        yield


# Without Ray -----------------------------------------------------------------------------------


def test_loss_memory(capsys):
    line = json_line(capsys, "loss_memory", "--smoke")
    check(
        line,
        {
            "benchmark",
            "positions",
            "vocab",
            "chunk_positions",
            "peak_mib",
            "logits_mib",
            "ratio",
            "ratio_meaning",
            "unchunked_ratio",
            "goal",
            "goal_met",
        },
    )
    assert [line[k] for k in ("benchmark", "positions", "vocab", "chunk_positions")] == ["loss_memory", 256, 512, 64]
    assert line["peak_mib"].keys() == {"ce", "kd_chunked", "kd_unchunked"}
    assert line["ratio"] > 0


def test_cache_fidelity(capsys):
    line = json_line(capsys, "cache_fidelity", "--smoke")
    check(
        line,
        {
            "benchmark",
            "teacher",
            "tokens",
            "vocab",
            "arms",
            "sampled_seed_noise_angle_deg",
            "kl_floor_eps",
            "student",
            "ratio",
            "ratio_meaning",
            "goal",
            "goal_met",
            "seconds",
        },
    )
    assert (line["teacher"], line["tokens"], line["vocab"]) == ("tiny-random-llama", 256, 512)
    arms = line["arms"]
    expected = {
        "sampled_n50",
        "sampled_n50_seed1",
        "topk12_tail",
        "topk12_renorm",
        "stratified_k8_m42",
        "stratified_k4_m24",
        "sampled_n24_draws2_epoch0",
        "sampled_n24_draws2_epoch1",
    }
    assert expected <= arms.keys()
    assert len([a for a in arms if a.endswith("_tail_equal_bytes")]) == 1
    metrics = {"bytes_per_token", "target_bytes_per_token", "ids_per_position", "kl_teacher_recon", "tvd"}
    for name, arm in arms.items():
        assert metrics | {"grad_angle_deg"} <= arm.keys(), name
        assert arm["bytes_per_token"] > arm["target_bytes_per_token"] > 0, name
    assert arms["topk12_tail"]["ids_per_position"] == 12


def test_quality_report_on_a_copy_of_the_results(capsys, tmp_path):
    """--report regenerates results.md/.png beside the result files it reads: on a copy of
    docs/results, into the copy's folder."""
    results = tmp_path / "docs" / "results"
    shutil.copytree(DOCS / "results", results)
    line = json_line(capsys, "quality", "--report", "--results", str(results))
    check(line, {"regimes", "goals", "teacher_other_genre_ce"})
    studied = benchmark("quality").REGIMES  # (cross_tokenizer/ has its own report, below)
    regimes = {p.name for p in results.iterdir() if p.is_dir() and any(p.glob("*.json")) and p.name in studied}
    assert line["regimes"].keys() == regimes
    for regime, arms in line["regimes"].items():
        files = {json.loads(f.read_text())["arm"] for f in (results / regime).glob("*.json")}
        assert arms.keys() == files
    assert (tmp_path / "docs" / "results.png").stat().st_size > 1000
    assert "# Does the teacher help?" in (tmp_path / "docs" / "results.md").read_text()


def test_cross_tokenizer_report_from_the_committed_results(capsys, tmp_path):
    """--report summarises docs/results/cross_tokenizer/ alone (no cache at --out: the teacher-
    tokenizer comparison is left out, the rest is there)."""
    line = json_line(capsys, "cross_tokenizer", "--report", "--out", str(tmp_path / "none"))
    check(line, {"arms", "best_cross_recipe", "goal_beats_ce_twin_every_seed", "teacher_bits_per_byte"})
    files = {json.loads(f.read_text())["arm"] for f in (DOCS / "results" / "cross_tokenizer").glob("*.json")}
    assert line["arms"].keys() == files and line["teacher_tokenizer_bits_per_byte"] == {}
    assert all(arm["seeds"] == [0, 1, 2] for arm in line["arms"].values())


# On the session's Ray ---------------------------------------------------------------------------


def on_ray(test):
    """Marked ``ray`` and ``slow``; runs on the session's Ray with the module's MLflow store."""
    for mark in (pytest.mark.ray, pytest.mark.slow, pytest.mark.usefixtures("ray_session", "bench_mlflow")):
        test = mark(test)
    return test


@on_ray
def test_gpu_throughput(capsys):
    """Its four arms on this machine's device (the CPU in CI; the numbers mean nothing there)."""
    line = json_line(capsys, "gpu_throughput", "--smoke")
    check(line, {"benchmark", "device", "teacher", "tokens", "bare", "forward_extract", "precompute", "ratio", "train"})
    for arm in ("bare", "forward_extract", "precompute", "train"):
        assert line[arm]["tokens_per_second"] > 0, arm
    assert line["precompute"]["tokens"] == line["forward_extract"]["tokens"] == line["tokens"]


@on_ray
def test_precompute_efficiency(capsys):
    line = json_line(capsys, "precompute_efficiency", "--smoke")
    check(
        line,
        {
            "benchmark",
            "teacher",
            "tokens",
            "thread_budget",
            "bare",
            "precompute",
            "sharded",
            "ratio",
            "ratio_meaning",
            "ratio_range",
            "sharded_ratio",
            "threaded",
            "threaded_ratio",
            "goal",
            "goal_met",
        },
    )
    assert line["teacher"] == "tiny-random-llama"
    for arm in ("bare", "precompute", "sharded", "threaded"):
        assert line[arm]["tokens_per_second"] > 0, arm
        assert line[arm]["tokens"] == line["bare"]["tokens"] > 0, arm
    assert len(line["sharded"]["layer_ranges"]) == 2
    low, high = line["ratio_range"]
    assert low <= line["ratio"] <= high  # the bare loop ran before and after the precompute arms
    assert line["bare"]["before"]["tokens"] == line["bare"]["after"]["tokens"] == line["bare"]["tokens"]


@on_ray
def test_precompute_scale(capsys):
    line = json_line(capsys, "precompute_scale", "--smoke")
    keys = {"benchmark", "arms", "ratios", "ratio_meaning", "one_large_file_by_several_tasks", "same_code", "goal"}
    check(line, keys | {"goal_met", "kdscale_code"})
    assert line["same_code"] and all(a["settings"]["cpus"] == 2 for a in line["arms"].values())
    assert set(line["arms"]) == {"large-4000", "large-12000", "small-4000", "small-12000"}
    for arm in line["arms"].values():
        assert arm["tokens"] > 0 and arm["units"] >= 1 and arm["first_shard_seconds"] <= arm["seconds"]
    assert line["one_large_file_by_several_tasks"] and line["arms"]["small-12000"]["units"] > 1


def test_precompute_scale_keeps_an_arm_only_for_its_settings(tmp_path):
    """A rerun reuses a finished arm measured with the same settings, and remeasures otherwise."""
    scale = benchmark("precompute_scale")
    settings = {"size": 3_000_000, "layout": "large", "cpus": 2, "unit_bytes": 1 << 26, "seed": 0}
    path = tmp_path / "large-3000000.json"
    assert scale.kept_arm(path, settings) is None
    path.write_text(json.dumps({"tokens": 3_000_000, "settings": settings, "code": "abc"}))
    assert scale.kept_arm(path, settings)["code"] == "abc"
    assert scale.kept_arm(path, {**settings, "cpus": 4}) is None
    assert scale.kdscale_code()  # the git tree of kdscale/, or "unknown" outside a checkout


@on_ray
def test_scaling(capsys):
    line = json_line(capsys, "scaling", "--smoke")
    check(line, {"benchmark", "tokens_per_second", "ratio", "ratio_meaning", "cpus"})
    assert line["tokens_per_second"].keys() == {"one-worker", "two-workers"}
    assert min(line["tokens_per_second"].values()) > 0


@on_ray
def test_train_throughput(capsys):
    line = json_line(capsys, "train_throughput", "--smoke")
    check(
        line,
        {
            "benchmark",
            "tokens",
            "epochs",
            "tokens_per_second",
            "epoch_seconds",
            "data_wait_seconds",
            "first_batch_wait_seconds",
            "ratio",
            "ratio_meaning",
            "goal",
            "goal_met",
        },
    )
    assert line["epochs"] == 1
    assert line["tokens_per_second"].keys() == {"streaming", "preloaded"}
    assert all(len(seconds) == 1 for seconds in line["epoch_seconds"].values())


@on_ray
def test_train_vs_bare(capsys):
    import ray

    line = json_line(capsys, "train_vs_bare", "--smoke")
    check(
        line,
        {
            "benchmark",
            "tokens_per_epoch",
            "epochs",
            "workers",
            "threads_per_worker",
            "tokens_per_second",
            "kdscale_epochs",
            "bare_epoch_seconds",
            "ratio",
            "ratio_meaning",
            "ratio_whole_run",
            "goal",
            "goal_met",
        },
    )
    assert line["tokens_per_second"]["kdscale"] > 0 and line["tokens_per_second"]["bare"] > 0
    assert len(line["kdscale_epochs"]) == len(line["bare_epoch_seconds"]) == 1
    assert ray.is_initialized()  # the session's Ray, which it did not start, is left running


@on_ray
def test_multi_student(capsys):
    line = json_line(capsys, "multi_student", "--smoke")
    check(line, {"benchmark", "tokens", "epochs", "students", "arms", "ratio", "ratio_meaning", "goal", "goal_met"})
    assert line["arms"].keys() == {"cache", "online"}
    for arm in line["arms"].values():
        assert arm["heldout_ce"].keys() == set(line["students"])
        assert arm["seconds"] > 0


@on_ray
def test_quality(capsys):
    line = json_line(capsys, "quality", "--smoke")
    check(line, {"regimes", "goals", "teacher_other_genre_ce"})
    arm = line["regimes"]["long"]["sampled"]  # the plan's first arm
    assert arm["seeds"] == [0]
    for key in ("heldout_ce", "validation_ce", "other_genre_ce", "bytes_per_token", "steps", "train_tokens"):
        assert arm[key] > 0, key


@on_ray
def test_interop_quality(capsys):
    line = json_line(capsys, "interop_quality", "--smoke")
    check(line, {"arms", "default_arm", "default_vs_distillkit_recommended_bytes", "goal_10x_smaller"})
    assert line["arms"].keys() == {"topk128", line["default_arm"]}
    assert line["arms"]["topk128"]["distillkit_documented_bytes_per_token"] == 328.0
    assert line["arms"]["topk128"]["bytes_per_token"] > line["arms"][line["default_arm"]]["bytes_per_token"]


@on_ray
def test_cross_tokenizer(capsys):
    line = json_line(capsys, "cross_tokenizer", "--smoke")
    check(line, {"arms", "best_cross_recipe", "best_vs_own_ce_pct_by_seed", "goal_beats_ce_twin_every_seed"})
    assert line["arms"].keys() == {"own_ce", "own_hybrid"}
    for arm in line["arms"].values():
        assert arm["bits_per_byte"] > 0 and 0 < arm["aligned_fraction"] <= 1
    assert line["teacher_bits_per_byte"] > 0


@on_ray
def test_fashion_mnist(capsys):
    line = json_line(capsys, "fashion_mnist", "--smoke")
    check(line, {"fashion_mnist", "goal"})
    result = line["fashion_mnist"]
    assert {"teacher", "small"} <= result.keys()
    assert {"test_error", "test_error_own_eval", "parameters", "train_seconds"} <= result["teacher"].keys()
    small = result["small"]
    assert {"scratch", "distilled", "ratio", "gap_closed", "job_seconds"} <= small.keys()
    for name in ("scratch", "distilled"):
        student = small[name]
        keys = {"test_error", "test_ce", "alpha", "validation_error", "validation_ce", "parameters", "train_seconds"}
        assert keys <= student.keys(), name
        assert 0 < student["test_error"] <= 1, name
    distilled = small["distilled"]
    assert (small["scratch"]["alpha"], distilled["alpha"], distilled["temperature"]) == (0.0, 0.5, 1.0)
