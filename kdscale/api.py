"""kdscale from Python: the same stages as the CLI (which is argument parsing, this, and printing).

    import kdscale
    spec = kdscale.load_job("jobs/tiny.yaml", overrides={"seed": 1})
    cache = kdscale.precompute(spec, workdir="runs/a", tracking=False)   # a verified LogitCache
    students = kdscale.train(spec, workdir="runs/a", tracking=False)     # {name: StudentResult}

``tracking=False`` needs no MLflow (nothing is recorded or registered); with ``True`` (the default)
runs go to MLFLOW_TRACKING_URI, the spec's ``tracking.uri``, or ``./mlflow.db``, as from the CLI.
Every function checks the whole spec and its inputs before any work and raises
:class:`~kdscale.config.ConfigError` listing every problem.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdscale.cache.store import LogitCache
from kdscale.config import JobSpec
from kdscale.config import load_job as _load_job


@dataclass(frozen=True)
class StudentResult:
    """One trained (or re-evaluated) student, from the job's summary.json."""

    name: str
    heldout_ce: float
    validation_ce: float | None
    export: str
    registered_model: dict[str, Any] | None
    steps: int | None
    summary: dict[str, Any]  # everything summary.json holds for this student

    @classmethod
    def from_summary(cls, name: str, entry: dict[str, Any]) -> StudentResult:
        return cls(
            name,
            entry["heldout_ce"],
            entry.get("validation_ce"),
            entry["export"],
            entry.get("registered_model"),
            entry.get("steps"),
            entry,
        )


@dataclass(frozen=True)
class JobResult:
    summary: dict[str, Any]
    students: dict[str, StudentResult]
    cache: LogitCache | None


def load_job(path: str | Path, overrides: dict[str, Any] | list[str] | None = None) -> JobSpec:
    """A validated job spec; ``overrides`` set dotted keys (``{"students.0.train.lr": 3e-4}``)."""
    return _load_job(path, overrides=overrides)


def _run(spec: JobSpec, stages: tuple[str, ...], workdir: str | None, tracking: bool) -> dict[str, Any]:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from kdscale import pipeline

    return pipeline.run(spec, stages, workdir, tracking=tracking)


def _students(summary: dict[str, Any]) -> dict[str, StudentResult]:
    return {name: StudentResult.from_summary(name, entry) for name, entry in summary.get("students", {}).items()}


def _cache(summary: dict[str, Any]) -> LogitCache | None:
    uri = summary.get("cache", {}).get("uri")
    return LogitCache.open(uri, checksums=False) if uri else None


def precompute(spec: JobSpec, workdir: str | None = None, tracking: bool = True) -> LogitCache:
    """Run the teacher into the job's cache (reusing a verified complete one, resuming an unfinished one)."""
    cache = _cache(_run(spec, ("precompute",), workdir, tracking))
    if cache is None:
        raise ValueError(f"job {spec.name} trains no student from a cache (all are online): nothing to precompute")
    return cache


def train(spec: JobSpec, workdir: str | None = None, tracking: bool = True) -> dict[str, StudentResult]:
    """Train, evaluate and export every student from the committed cache (online students run the teacher)."""
    return _students(_run(spec, ("train",), workdir, tracking))


def evaluate(spec: JobSpec, workdir: str | None = None, tracking: bool = True) -> dict[str, StudentResult]:
    """Re-evaluate the exported students."""
    return _students(_run(spec, ("eval",), workdir, tracking))


def run(spec: JobSpec, workdir: str | None = None, tracking: bool = True) -> JobResult:
    """Precompute, train, evaluate and export: ``kdscale run``."""
    summary = _run(spec, ("precompute", "train", "eval"), workdir, tracking)
    return JobResult(summary, _students(summary), _cache(summary))


def open_cache(uri: str, checksums: bool = True) -> LogitCache:
    """A committed cache, verified (every reader's checks; ``checksums`` adds every file's sha256)."""
    return LogitCache.open(uri, checksums=checksums)
