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
from kdscale.interop.importer import ImportSettings
from kdscale.stages import STAGES


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


def run_stages(
    spec: JobSpec, stages: tuple[str, ...] = STAGES, workdir: str | None = None, tracking: bool = True
) -> JobResult:
    """The given stages in order (what every CLI job command runs); the summary they wrote."""
    summary = _run(spec, stages, workdir, tracking)
    return JobResult(summary, _students(summary), None)


def plan(spec: JobSpec, stages: tuple[str, ...] = STAGES, workdir: str | None = None) -> dict[str, Any]:
    """``--dry-run``: every check a real run makes before work that needs no teacher pass, and
    the plan (actors, shards, students, the committed cache for train/eval). Writes nothing."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from kdscale import pipeline

    return pipeline.dry_run(spec, stages, workdir)


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
    summary = _run(spec, STAGES, workdir, tracking)
    return JobResult(summary, _students(summary), _cache(summary))


# On a Ray cluster (``kdscale submit`` / ``kdscale jobs``) -----------------------------------------


def submit_job(
    job: str | Path,
    workdir: str,
    *,
    address: str | None = None,
    overrides: list[str] | None = None,
    stage: str = "run",
    allow_local_paths: bool = False,
) -> str:
    """``kdscale submit``: the job spec at ``job`` (its relative files travel with it) runs
    ``kdscale <stage>`` on the Ray cluster at ``address`` (default RAY_ADDRESS) through Ray Jobs,
    writing to ``workdir`` (a URI the cluster can write); the Ray job id. Raises ConfigError or
    SubmitError before anything reaches the cluster."""
    from kdscale import submit as jobs

    return jobs.submit(
        Path(job),
        address=address,
        workdir=workdir,
        overrides=overrides or [],
        allow_local_paths=allow_local_paths,
        stage=stage,
    )


def follow_job(job_id: str, address: str | None = None, write: Any = None) -> str:
    """Stream a submitted job's logs to ``write`` (default: stdout) until it ends; its final status."""
    import sys

    from kdscale import submit as jobs

    return jobs.follow(address, job_id, write or (lambda lines: sys.stdout.write(lines)))


def job_status(job_id: str, address: str | None = None) -> dict[str, Any]:
    """A submitted job's status, message and entrypoint (``kdscale jobs status``)."""
    from kdscale import submit as jobs

    return jobs.status(address, job_id)


def list_jobs(address: str | None = None) -> list[dict[str, Any]]:
    """Jobs submitted with ``kdscale submit`` (``kdscale jobs list``), newest first: id, job name,
    stage, workdir, status, start and end times."""
    from kdscale import submit as jobs

    return jobs.list_jobs(address)


def job_logs(job_id: str, address: str | None = None) -> str:
    """A submitted job's logs so far."""
    from kdscale import submit as jobs

    return jobs.logs(address, job_id)


def stop_job(job_id: str, address: str | None = None) -> bool:
    """Ask Ray to stop a submitted job; False if it had already ended."""
    from kdscale import submit as jobs

    return jobs.stop(address, job_id)


def open_cache(uri: str, checksums: bool = True) -> LogitCache:
    """A committed cache, verified (every reader's checks; ``checksums`` adds every file's sha256)."""
    return LogitCache.open(uri, checksums=checksums)


def describe_cache(uri: str) -> dict[str, Any]:
    """A verified cache's kind, size, bytes per token and fingerprints (``kdscale cache inspect``)."""
    from kdscale.cache.profile import describe

    return describe(open_cache(uri, checksums=False).manifest)


@dataclass(frozen=True)
class Imported:
    """An imported cache: the verified cache, what the import found in the source's values (mass
    above 1, next token in the top-k, ...), and its MLflow run (None without tracking)."""

    cache: LogitCache
    reused: bool
    quality: dict[str, Any]
    run_id: str | None


def import_cache(
    src: str,
    dest: str,
    fmt: str,
    tokenizer: str,
    settings: ImportSettings | None = None,
    *,
    tracking: bool = True,
    experiment: str | None = None,
    tracking_uri: str | None = None,
) -> Imported:
    """Another tool's teacher outputs (``fmt``: ``distillkit`` or ``vllm-topk``) as a kdscale
    ``topk`` cache at ``dest`` (:mod:`kdscale.interop.importer`); logged as an MLflow run.
    ``settings``: teacher name, seq_len and split fractions (defaults: :class:`ImportSettings`)."""
    from kdscale.interop.importer import import_cache as run_import
    from kdscale.tracking import lineage

    settings = settings or ImportSettings()
    uri = tracking_uri or lineage.tracking_uri()
    if tracking:
        lineage.check_reachable(uri)
    result = run_import(src, dest, fmt, tokenizer, settings)
    run_id = None
    if tracking:
        m, q = result.manifest, result.quality
        params = {"format": fmt, "source": src, "tokenizer": tokenizer, "k": m.targets.k, **settings.model_dump()}
        metrics = {
            "tokens": m.totals["tokens"],
            "bytes_per_token": m.totals["bytes_per_token"],
            "reused": float(result.reused),
            "mean_mass": q["mean_mass"],
            "max_mass": q["max_mass"],
            "positions_mass_over_1": q["positions_mass_over_1"],
            "next_token_in_topk": q["next_token_in_topk"],
        }
        run_id = lineage.log_import(
            uri, experiment or lineage.IMPORT_EXPERIMENT, m, result.cache_uri, {**params, "cache_uri": dest}, metrics
        )
    return Imported(LogitCache(result.cache_uri, result.manifest), result.reused, result.quality, run_id)


def export_cache(cache: str, dest: str, fmt: str = "vllm-topk") -> dict[str, int]:
    """A verified topk/stratified cache's top-k as vLLM-topk JSONL under ``dest``; rows per split."""
    from kdscale.interop.importer import export_cache as run_export

    return run_export(cache, dest, fmt)


@dataclass(frozen=True)
class Report:
    data: dict[str, Any]  # what report.json holds
    not_logged: str | None  # why it could not be logged to MLflow (None: logged, or no run to log to)


def report(workdir: str, baseline: str | None = None) -> Report:
    """Every student a job trained beside its baseline (``kdscale report``): report.json / .md /
    .png in the workdir, also logged to the job's MLflow parent run (MLFLOW_TRACKING_URI, else the
    URI the job recorded). Raises ReportError when the workdir holds no job or no baseline."""
    from kdscale import fs
    from kdscale import summary as summary_files
    from kdscale.report import ReportError

    folder = fs.normalize(workdir)
    summary = summary_files.read_summary(folder)
    if not summary:
        raise ReportError(f"no {summary_files.SUMMARY} in {workdir}: not a job's workdir, or nothing ran there yet")
    summary["workdir"] = folder
    mlflow = summary.get("mlflow", {})
    uri = os.environ.get("MLFLOW_TRACKING_URI") or mlflow.get("tracking_uri")
    data = summary_files.write_report(summary, baseline)
    try:
        if uri and mlflow.get("parent_run_id"):
            summary_files.log_report(folder, uri, mlflow["parent_run_id"])
    except Exception as e:  # the report stands without MLflow; say why it was not logged
        return Report(data, f"{type(e).__name__}: {str(e)[:200]}")
    return Report(data, None)
