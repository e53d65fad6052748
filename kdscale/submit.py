"""``kdscale submit``: a job spec to a Ray cluster through Ray's Job Submission SDK, and the
``kdscale jobs`` commands around it. A thin Ray module: nothing here knows what a job does.

What travels with the job: the spec (overrides applied) as ``job.yaml`` in a runtime-env working
directory together with every file the spec names by a *relative* path (tokenizer folders, small
corpora, student init folders), laid out as beside the original spec so the same relative paths
resolve; and the environment the job needs (MLflow tracking URI and credentials, the S3 endpoint
and credentials), passed through as runtime-env variables and never printed or logged.

What cannot travel is refused before anything reaches the cluster, with one message listing every
problem by field: an absolute path on this machine (workers elsewhere cannot read it: use an
object-store URI, or ``--allow-local-paths`` on a shared filesystem), a working directory over
``MAX_PACKAGE_BYTES`` (large corpora belong on object storage), a tracking store that is a
sqlite file here, an unreachable cluster.
"""

from __future__ import annotations

import asyncio
import glob
import math
import os
import shlex
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from kdscale import fs
from kdscale.config import ConfigError, JobSpec, apply_overrides, input_path_fields, load_job
from kdscale.stages import COMMANDS
from kdscale.summary import utc

JOB_METADATA = "kdscale.job"  # the Ray job's metadata key holding the kdscale job's name: how `jobs list` finds them
STAGE_METADATA, WORKDIR_METADATA = "kdscale.stage", "kdscale.workdir"  # what it runs and where it writes
MAX_PACKAGE_BYTES = 100 * 2**20  # far below Ray's own working-directory limit; corpora go to object storage
JOB_FILE = "job.yaml"
# Passed to the job when set here: where runs are tracked, and the object store's endpoint and
# credentials (values are never printed).
PASS_THROUGH_ENV = (
    "MLFLOW_TRACKING_URI",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
    "MLFLOW_S3_ENDPOINT_URL",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
)


class SubmitError(RuntimeError):
    """The cluster cannot be reached, or refused the job."""


def _path_fields(raw: dict[str, Any]) -> Iterator[tuple[str, str, bool]]:
    """(field, value, is_input) for every path a spec may hold: its inputs (which may be packaged
    when relative) and the cache URI (an output the cluster must read and write)."""
    for container, key, field in input_path_fields(raw):
        yield field, container[key], True
    cache = raw.get("cache") or {}
    if isinstance(cache.get("uri"), str):
        yield "cache.uri", cache["uri"], False


def _portable(value: str) -> bool:
    return value.startswith("pkg:") or fs.is_remote(value)


@dataclass
class Package:
    folder: Path  # the runtime env's working directory (job.yaml and the relative inputs)
    files: int
    bytes: int


def _copy_input(base: Path, value: str, folder: Path) -> list[Path]:
    """Copy what a relative path (or glob) names into ``folder`` at the same place relative to
    the job file; ValueError for a match outside the job's folder (its layout cannot be kept)."""
    copied = []
    for match in sorted(glob.glob(str(base / value))):
        source = Path(match).resolve()
        if not source.is_relative_to(base):
            raise ValueError(f"{value} leaves the job's folder {base}: move it beside the job file, or use a URI")
        target = folder / source.relative_to(base)
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target, dirs_exist_ok=True)
            copied += [p for p in target.rglob("*") if p.is_file()]
        else:
            shutil.copy2(source, target)
            copied.append(target)
    return copied


def package_job(
    job: Path, overrides: list[str], workdir: str, allow_local_paths: bool, env: dict[str, str]
) -> tuple[Package, JobSpec]:
    """Validate the spec here (every problem at once) and build its working directory."""
    from kdscale.spec_yaml import load_spec_yaml
    from kdscale.tracking.lineage import tracking_uri

    spec = load_job(job, check_resources=False, overrides=overrides)
    raw = load_spec_yaml(job.read_bytes())
    apply_overrides(raw, overrides)
    base = job.parent.resolve()
    folder = Path(tempfile.mkdtemp(prefix="kdscale-submit-"))
    problems: list[tuple[str, str]] = []
    files: list[Path] = []
    for field, value, is_input in _path_fields(raw):
        if _portable(value):
            continue
        if Path(value).is_absolute() or not is_input:
            if not allow_local_paths:
                problems.append((field, f"{value} is a path on this machine, which the cluster's workers cannot read: "
                                 "use an object-store URI (s3://...), a path relative to the job file, or "
                                 "--allow-local-paths on a filesystem every node mounts"))  # fmt: skip
            continue
        try:
            found = _copy_input(base, value, folder)
        except ValueError as e:
            problems.append((field, str(e)))
            continue
        if not found:
            problems.append((field, f"{value} matches nothing beside {job}"))
        files += found
    if not _portable(workdir) and not allow_local_paths:
        problems.append(
            ("--workdir", f"{workdir} is not a URI the cluster can write (s3://..., or --allow-local-paths)")
        )
    uri = env.get("MLFLOW_TRACKING_URI") or spec.tracking.uri or tracking_uri()
    if uri.startswith("sqlite:") and not allow_local_paths:
        problems.append(("tracking.uri", "the tracking store is a sqlite file on this machine: set MLFLOW_TRACKING_URI "
                         "to an MLflow server the cluster reaches (http://...)"))  # fmt: skip
    size = sum(p.stat().st_size for p in files)
    if size > MAX_PACKAGE_BYTES:
        limit = MAX_PACKAGE_BYTES / 2**20
        message = (
            f"the job's relative inputs hold {size / 2**20:.0f} MiB, over the {limit:.0f} MiB a submission carries"
        )
        problems.append(("<files>", message + ": put large corpora on object storage"))
    if problems:
        shutil.rmtree(folder, ignore_errors=True)
        raise ConfigError(str(job), problems)
    (folder / JOB_FILE).write_text(yaml.safe_dump(raw, sort_keys=False))
    return Package(folder, len(files) + 1, size), spec


def client(address: str | None):
    """The cluster's Job Submission client (address: the dashboard's http://host:8265), or a
    SubmitError saying why it cannot be reached."""
    from ray.job_submission import JobSubmissionClient

    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        raise SubmitError("no cluster address: pass --address http://HEAD:8265 or set RAY_ADDRESS")
    try:
        return JobSubmissionClient(address)
    except Exception as e:  # connection refused, DNS, not a Ray dashboard
        raise SubmitError(f"cannot reach the Ray cluster at {address}: {type(e).__name__}: {str(e)[:300]}") from None


def submit(
    job: Path,
    *,
    address: str | None,
    workdir: str,
    overrides: list[str],
    allow_local_paths: bool = False,
    env: dict[str, str] | None = None,
    stage: str = "run",
) -> str:
    """Submit ``kdscale <stage>`` of the job (default ``run``: every stage; ``precompute`` runs
    the teacher into the cache alone); returns the Ray job id. Nothing reaches the cluster unless
    the spec validates and packages."""
    if stage not in COMMANDS:  # a submitted job runs the CLI command of that name on the cluster
        raise SubmitError(f"stage {stage!r} is not one of {', '.join(COMMANDS)}")
    env = dict(os.environ if env is None else env)
    package, spec = package_job(job, overrides, workdir, allow_local_paths, env)
    try:
        jobs = client(address)
        entrypoint = f"kdscale {stage} {JOB_FILE} --workdir {shlex.quote(workdir)}"
        env_vars = {k: env[k] for k in PASS_THROUGH_ENV if env.get(k)}
        runtime_env = {"working_dir": str(package.folder), "env_vars": env_vars}
        metadata = {JOB_METADATA: spec.name, STAGE_METADATA: stage, WORKDIR_METADATA: workdir}
        return _submit_when_ready(jobs, entrypoint, runtime_env, metadata)
    finally:
        shutil.rmtree(package.folder, ignore_errors=True)


AGENT_WAIT_S = 120.0  # a cluster that just started has no job agent yet for a minute or so


def _submit_when_ready(jobs, entrypoint: str, runtime_env: dict, metadata: dict) -> str:
    """Submit, retrying while the cluster's job agent is not up yet ("No available agent")."""
    deadline = time.monotonic() + AGENT_WAIT_S
    while True:
        try:
            return jobs.submit_job(entrypoint=entrypoint, runtime_env=runtime_env, metadata=metadata)
        except RuntimeError as e:
            if "No available agent" not in str(e) or time.monotonic() > deadline:
                raise SubmitError(f"the cluster refused the job: {str(e)[:500]}") from None
            time.sleep(2)


def follow(address: str | None, job_id: str, write) -> str:
    """Stream the job's logs to ``write`` until it ends; its final status."""
    jobs = client(address)

    async def tail() -> None:
        async for lines in jobs.tail_job_logs(job_id):
            write(lines)

    asyncio.run(tail())
    return _name(jobs.get_job_status(job_id))


def _name(state: Any) -> str:
    return str(getattr(state, "value", state))


def status(address: str | None, job_id: str) -> dict[str, Any]:
    info = client(address).get_job_info(job_id)
    return {"job_id": job_id, "status": _name(info.status), "message": info.message, "entrypoint": info.entrypoint}


def list_jobs(address: str | None) -> list[dict[str, Any]]:
    """kdscale's submissions to the cluster (Ray jobs carrying the ``kdscale.job`` metadata; any
    other job is not ours to show), newest first: id, kdscale job name, stage, workdir (both from
    the metadata :func:`submit` sets), status and start/end times (UTC, ISO 8601). A user who lost
    a job id finds it here, with where it writes."""
    ours = [info for info in client(address).list_jobs() if JOB_METADATA in (info.metadata or {})]
    rows = []
    for info in sorted(ours, key=lambda i: i.start_time or math.inf, reverse=True):  # none yet: just submitted
        rows.append(
            {
                "job_id": info.submission_id,
                "job": info.metadata[JOB_METADATA],
                "stage": info.metadata.get(STAGE_METADATA),
                "workdir": info.metadata.get(WORKDIR_METADATA),
                "status": _name(info.status),
                "started": _utc(info.start_time),
                "ended": _utc(info.end_time),
            }
        )
    return rows


def _utc(milliseconds: int | None) -> str | None:
    """Ray's job times (milliseconds since the epoch) as ISO 8601 UTC to the second."""
    return utc(milliseconds / 1000) if milliseconds else None


def logs(address: str | None, job_id: str) -> str:
    return client(address).get_job_logs(job_id)


def stop(address: str | None, job_id: str) -> bool:
    return client(address).stop_job(job_id)
