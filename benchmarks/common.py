"""Shared helpers for the benchmarks: the quickstart job with overrides, run through kdscale's
own pipeline (the same code the CLI runs), on a local Ray with a fixed CPU budget; and the
``--smoke`` mode every benchmark has: the same code path on jobs/tiny.yaml's random teacher and
student, a few tokens and 1 epoch, output in a temp folder (seconds; its numbers mean nothing).
tests/test_benchmarks_smoke.py runs each benchmark's smoke mode, so none breaks unnoticed."""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from kdscale.config import JobSpec, load_job  # noqa: E402
from kdscale.stages import STAGES  # noqa: E402

QUICKSTART = REPO / "jobs" / "quickstart.yaml"
TINY = REPO / "jobs" / "tiny.yaml"  # the tests' tiny random teacher, tokenizer, corpus and student

SMOKE_HELP = (
    "smoke test: the same code path on jobs/tiny.yaml's random teacher and student, a few tokens, "
    "1 epoch, output in a temp folder (seconds; the numbers mean nothing)"
)
SMOKE_TOKENS = 1024  # 16 rows of the tiny job's 64 tokens: 1-2 optimizer steps per epoch
SMOKE_EPOCHS = 1


def add_smoke(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--smoke", action="store_true", help=SMOKE_HELP)


def tiny_job() -> dict:
    """jobs/tiny.yaml as a plain mapping, its relative paths (tokenizer, corpus) made absolute."""
    return load_job(TINY).model_dump(mode="json")


def quickstart(
    smoke: bool = False, check_resources: bool = True, shared_smoke_cache: bool = False, **overrides: Any
) -> JobSpec:
    """jobs/quickstart.yaml (``smoke``: jobs/tiny.yaml) with dotted overrides, e.g.
    ``{"corpus.max_tokens": 16384}``; a ``students`` override replaces the list (each entry merged
    over the job's first student). ``check_resources=False``: the quickstart's own files (teacher
    package, corpus) need not exist here, because the overrides replace them.
    ``shared_smoke_cache``: a benchmark that times training only lets its smoke run read a cache
    shared with other smoke runs (see SMOKE_CACHES_ENV)."""
    raw = tiny_job() if smoke else load_job(QUICKSTART, check_resources).model_dump(mode="json")
    base_student = raw["students"][0]
    for dotted, value in overrides.items():
        if dotted == "students":
            raw["students"] = [_merge(base_student, s) for s in value]
            continue
        set_dotted(raw, dotted, value)
    if smoke and shared_smoke_cache and os.environ.get(SMOKE_CACHES_ENV) and not raw["cache"].get("uri"):
        raw["cache"]["uri"] = _shared_smoke_cache(raw)
    return JobSpec.model_validate(raw)


# Where smoke runs keep their caches to share them (set by tests/test_benchmarks_smoke.py): the
# training benchmarks' smoke jobs differ only in their students, so they read one teacher pass
# (a tiny precompute is ~15 s, almost all teacher actors starting) instead of one each.
SMOKE_CACHES_ENV = "KDSCALE_SMOKE_CACHES"


def _shared_smoke_cache(raw: dict) -> str:
    """A folder per teacher, corpus and cache settings (what names a cache) under $KDSCALE_SMOKE_CACHES."""
    import hashlib
    import json

    identity = json.dumps([raw["seed"], raw["teacher"], raw["corpus"], raw["cache"]], sort_keys=True)
    return str(Path(os.environ[SMOKE_CACHES_ENV]) / hashlib.sha256(identity.encode()).hexdigest()[:16])


def packed_rows(spec: JobSpec, tokenizer) -> Any:
    """Every row the job's precompute would run the teacher on (train, held-out, validation), packed
    in this process as [rows, seq_len] token ids: the bare teacher loops' input."""
    import numpy as np

    from kdscale.data.corpus import pack_corpus

    packed = pack_corpus(spec.corpus, tokenizer)
    return np.stack(packed.train + packed.heldout + packed.validation)


def set_dotted(spec: dict, dotted: str, value: Any) -> None:
    """Set ``spec["a"]["b"][0]["c"]`` from ``"a.b.0.c"`` (numbers index lists)."""
    node = spec
    *parents, leaf = dotted.split(".")
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    node[leaf] = value


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def training_args(
    doc: str, epochs: int, tokens: int = 16384, workers: bool = False, argv: list[str] | None = None
) -> argparse.Namespace:
    """``--tokens`` (quickstart corpus slice) and ``--epochs`` for the training benchmarks (and
    ``--workers`` / ``--threads``: training workers and torch threads per worker); ``--smoke``
    sets the tokens and epochs to the smoke sizes."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=tokens)
    ap.add_argument("--epochs", type=int, default=epochs)
    if workers:
        ap.add_argument("--workers", type=int, default=2)
        ap.add_argument("--threads", type=int, default=None, help="torch threads per worker (default: its CPUs)")
    add_smoke(ap)
    args = ap.parse_args(argv)
    if args.smoke:
        args.tokens, args.epochs = SMOKE_TOKENS, SMOKE_EPOCHS
    return args


def same_allocator_here() -> None:
    """Re-run this script with the malloc setting kdscale's workers start with, so the bare loop (in
    this process) is not slowed by page faults the workers avoid (kdscale.ray_runtime.worker_env)."""
    from kdscale.ray_runtime import worker_env

    env = worker_env()
    if os.environ.get("GLIBC_TUNABLES") != env["GLIBC_TUNABLES"]:
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **env})


def start_ray(cpus: int) -> bool:
    """A local Ray with ``cpus`` CPUs, and MLflow records in a throwaway sqlite file; an already
    initialized Ray (the test session's, for smoke runs called in-process) is reused instead.
    True when this call started Ray."""
    import tempfile

    import ray

    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{tempfile.mkdtemp(prefix='kdscale-bench-')}/mlflow.db")
    if ray.is_initialized():
        return False

    from kdscale.ray_runtime import worker_env

    ray.init(
        num_cpus=cpus,
        include_dashboard=False,
        logging_level="warning",
        log_to_driver=False,
        runtime_env={"env_vars": worker_env(local=True)},
    )
    return True


def run(spec: JobSpec, workdir: str, stages: tuple[str, ...] = STAGES) -> dict:
    from kdscale import pipeline

    return pipeline.run(spec, tuple(stages), workdir)


def steady_rate(student_summary: dict) -> float:
    """Training tokens/s over epochs 2..E (epoch 1 carries warm-up and any preloading)."""
    later = student_summary["epochs"][1:] or student_summary["epochs"]
    return sum(e["tokens"] for e in later) / sum(e["seconds"] for e in later)


def train_rates(students: list[dict], tokens: int, smoke: bool = False) -> tuple[dict, dict[str, float]]:
    """Run the quickstart job (``smoke``: the tiny one) with ``students`` on a ``tokens`` slice in a
    throwaway workdir; the summary and each student's steady training tokens/s."""
    import tempfile

    spec = quickstart(smoke, shared_smoke_cache=True, **{"corpus.max_tokens": tokens, "students": students})
    with tempfile.TemporaryDirectory() as tmp:
        summary = run(spec, tmp)
    return summary, {name: steady_rate(st) for name, st in summary["students"].items()}


def kdscale_run(
    job: Path, workdir: Path, mlflow_uri: str, log: Path, what: str, in_process: bool = False, command: str = "run"
) -> None:
    """``kdscale run JOB --workdir WORKDIR`` (or another ``command``: precompute, train) with MLflow
    records in ``mlflow_uri`` and its output in ``log``; SystemExit when it fails. A subprocess with
    a Ray of its own, or with ``in_process`` the same CLI called in this process (reusing its Ray: a
    smoke test's, instead of a new one)."""
    args = [command, str(job), "--workdir", str(workdir)]
    if not in_process:
        env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_uri}
        proc = subprocess.run(
            [str(Path(sys.executable).with_name("kdscale")), *args], env=env, capture_output=True, text=True
        )
        code, output = proc.returncode, proc.stdout + proc.stderr
    else:
        from kdscale.cli import app

        buffer = io.StringIO()
        saved = os.environ.get("MLFLOW_TRACKING_URI")
        os.environ["MLFLOW_TRACKING_URI"] = mlflow_uri
        try:
            with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
                code = app(args, standalone_mode=False) or 0
        except BaseException:
            log.write_text(buffer.getvalue() + traceback.format_exc())
            raise
        finally:
            if saved is None:
                os.environ.pop("MLFLOW_TRACKING_URI", None)
            else:
                os.environ["MLFLOW_TRACKING_URI"] = saved
        output = buffer.getvalue()
    log.write_text(output)
    if code != 0:
        raise SystemExit(f"kdscale run ({what}) failed (exit {code}); see {log}")


def git_head() -> str:
    proc = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return proc.stdout.strip() or "unknown"


def commit_file(path: Path, message: str) -> None:
    """Commit one result file (only it: other staged work is left alone); retried while another
    git command holds the index."""
    top = subprocess.run(
        ["git", "-C", str(path.parent), "rev-parse", "--show-toplevel"], capture_output=True, text=True
    ).stdout.strip()
    for _ in range(20):
        add = subprocess.run(["git", "-C", top, "add", str(path)], capture_output=True, text=True)
        done = (
            add.returncode == 0
            and subprocess.run(
                ["git", "-C", top, "commit", "-q", "-m", message, "--", str(path)], capture_output=True, text=True
            ).returncode
            == 0
        )
        if done:
            return
        time.sleep(3)
    print(f"could not commit {path}", file=sys.stderr)
