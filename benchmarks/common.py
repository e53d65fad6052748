"""Shared helpers for the benchmarks: the quickstart job with overrides, run through kdscale's
own pipeline (the same code the CLI runs), on a local Ray with a fixed CPU budget."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from kdscale.config import JobSpec, load_job  # noqa: E402

QUICKSTART = REPO / "jobs" / "quickstart.yaml"


def quickstart(**overrides: Any) -> JobSpec:
    """jobs/quickstart.yaml with dotted overrides, e.g. ``{"corpus.max_tokens": 16384}``; a
    ``students`` override replaces the list (each entry merged over the quickstart student)."""
    raw = load_job(QUICKSTART).model_dump(mode="json")
    base_student = raw["students"][0]
    for dotted, value in overrides.items():
        if dotted == "students":
            raw["students"] = [_merge(base_student, s) for s in value]
            continue
        set_dotted(raw, dotted, value)
    return JobSpec.model_validate(raw)


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


def training_args(doc: str, epochs: int, tokens: int = 16384, workers: bool = False) -> argparse.Namespace:
    """``--tokens`` (quickstart corpus slice) and ``--epochs`` for the training benchmarks (and
    ``--workers`` / ``--threads``: training workers and torch threads per worker)."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=tokens)
    ap.add_argument("--epochs", type=int, default=epochs)
    if workers:
        ap.add_argument("--workers", type=int, default=2)
        ap.add_argument("--threads", type=int, default=None, help="torch threads per worker (default: its CPUs)")
    return ap.parse_args()


def start_ray(cpus: int) -> None:
    """A local Ray with ``cpus`` CPUs, and MLflow records in a throwaway sqlite file."""
    import os
    import tempfile

    import ray

    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{tempfile.mkdtemp(prefix='kdscale-bench-')}/mlflow.db")

    from kdscale.ray_runtime import worker_env

    ray.init(
        num_cpus=cpus,
        include_dashboard=False,
        logging_level="warning",
        log_to_driver=False,
        runtime_env={"env_vars": worker_env()},
    )


def run(spec: JobSpec, workdir: str, stages=("precompute", "train", "eval")) -> dict:
    from kdscale import pipeline

    return pipeline.run(spec, tuple(stages), workdir)


def steady_rate(student_summary: dict) -> float:
    """Training tokens/s over epochs 2..E (epoch 1 carries warm-up and any preloading)."""
    later = student_summary["epochs"][1:] or student_summary["epochs"]
    return sum(e["tokens"] for e in later) / sum(e["seconds"] for e in later)


def train_rates(students: list[dict], tokens: int) -> tuple[dict, dict[str, float]]:
    """Run the quickstart job with ``students`` on a ``tokens`` slice in a throwaway workdir;
    the summary and each student's steady training tokens/s."""
    import tempfile

    spec = quickstart(**{"corpus.max_tokens": tokens, "students": students})
    with tempfile.TemporaryDirectory() as tmp:
        summary = run(spec, tmp)
    return summary, {name: steady_rate(st) for name, st in summary["students"].items()}
