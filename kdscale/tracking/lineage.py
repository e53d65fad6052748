"""MLflow lineage: a parent run per job invocation, child runs per stage, and the cache as an
MLflow dataset whose digest is the cache_id — the key that links teacher -> cache -> students.

We use ``MlflowClient`` with explicit run ids rather than MLflow's fluent, process-global "active
run", because stages nest and training workers log into a run the driver created.
"""

from __future__ import annotations

import json
import os
import threading
import time
import warnings
from typing import Any

from kdscale.cache.format import Manifest
from kdscale.config import JobSpec
from kdscale.processes import alive, host
from kdscale.tracking.redact import redact, redact_text

CACHE_ID_TAG = "kdscale.cache_id"
TEACHER_TAG = "kdscale.teacher_fingerprint"
TOKENIZER_TAG = "kdscale.tokenizer_fingerprint"
CONTENT_HASH_TAG = "kdscale.dataset_content_hash"
STUDENT_TAG = "kdscale.student"
MANIFEST_ARTIFACT = "cache/manifest.json"
STAGE_TAG = "kdscale.stage"
JOB_TAG = "kdscale.job"
PARENT_TAG = "mlflow.parentRunId"
DATASET_CONTEXT = "mlflow.data.context"
HOST_TAG = "kdscale.host"
PID_TAG = "kdscale.pid"


def tracking_uri(spec: JobSpec | None = None) -> str:
    """MLFLOW_TRACKING_URI wins, then the spec, then a sqlite file in the current directory."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    if spec is not None and spec.tracking.uri:
        return spec.tracking.uri
    return f"sqlite:///{os.path.abspath('mlflow.db')}"


def local_artifact_root(uri: str, experiment: str) -> str | None:
    """For a sqlite store, artifacts go beside the database file (MLflow's default is ./mlruns
    of whatever directory the job was started from); servers choose their own."""
    if not uri.startswith("sqlite:///"):
        return None
    from pathlib import Path

    db = Path(uri[len("sqlite:///") :]).resolve()
    return (db.parent / "mlartifacts" / experiment).as_uri()


class TrackingUnavailable(RuntimeError):
    """The MLflow tracking store cannot be reached; raised before any work is done."""


def check_reachable(uri: str, timeout: float = 10.0) -> None:
    """Fail fast, with a message that says what to do, when the tracking store is not there.

    MLflow's client retries an unreachable server for minutes before giving up, and would do so
    only after the teacher had run; we ask once, with a short timeout, before anything starts."""
    from urllib.parse import urlparse

    shown = redact_text(uri)
    hint = (
        "start the server, or point MLFLOW_TRACKING_URI / tracking.uri at a reachable one "
        "(sqlite:///mlflow.db records locally). Nothing was run."
    )
    scheme = urlparse(uri).scheme
    try:
        if scheme in ("http", "https"):
            import requests

            response = requests.get(uri.rstrip("/") + "/health", timeout=timeout)
            if response.status_code != 200:
                raise TrackingUnavailable(
                    f"MLflow tracking server {shown} answered /health with HTTP {response.status_code}: {hint}"
                )
            headers = {}
            token = os.environ.get("MLFLOW_TRACKING_TOKEN")
            if token:
                headers["Authorization"] = f"Bearer {token}"
            response = requests.get(
                uri.rstrip("/") + "/api/2.0/mlflow/experiments/search",
                params={"max_results": 1},
                headers=headers,
                timeout=timeout,
            )
            if response.status_code in (401, 403):
                raise TrackingUnavailable(
                    f"MLflow tracking server {shown} refused the credentials "
                    f"(HTTP {response.status_code}): set MLFLOW_TRACKING_TOKEN or "
                    "MLFLOW_TRACKING_USERNAME/PASSWORD. Nothing was run."
                )
        elif scheme not in ("databricks", "databricks-uc", "uc"):
            from mlflow import MlflowClient

            MlflowClient(uri).search_experiments(max_results=1)
    except TrackingUnavailable:
        raise
    except Exception as e:  # connection refused, DNS, database down: all the same to the user
        reason = redact_text(str(e).splitlines()[0] if str(e) else type(e).__name__)
        raise TrackingUnavailable(
            f"MLflow tracking store {shown} is unreachable ({type(e).__name__}: {reason[:300]}): {hint}"
        ) from None


def _cache_dataset(manifest: Manifest, cache_uri: str):
    """The cache as an MLflow dataset: source = its URI, digest = cache_id, schema and profile
    from the manifest (no data is read)."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.types import ColSpec, Schema

    class LogitCacheDataset(MetaDataset):
        @property
        def profile(self) -> dict[str, Any]:
            t = manifest.totals
            return {
                "rows": t["rows"],
                "tokens": t["tokens"],
                "bytes": t["bytes"],
                "bytes_per_token": round(t["bytes_per_token"], 3),
                "target_kind": manifest.targets.kind,
                "teacher": manifest.teacher.name,
            }

        def to_dict(self) -> dict[str, str]:
            d = super().to_dict()
            d["profile"] = json.dumps(self.profile)
            return d

    schema = Schema([ColSpec("string", name) for name in manifest.columns["train"]])
    with warnings.catch_warnings():
        # MLflow registers its local-file source under two schemes and warns it "could be either".
        warnings.simplefilter("ignore", UserWarning)
        source = resolve_dataset_source(redact_text(cache_uri))
    return LogitCacheDataset(
        source=source, name=f"kdscale-cache-{manifest.cache_id[:8]}", digest=manifest.cache_id, schema=schema
    )


def experiment_id(client, uri: str, name: str) -> str:
    """The experiment's id, created (artifacts beside a sqlite store) if it does not exist."""
    experiment = client.get_experiment_by_name(name)
    if experiment:
        return experiment.experiment_id
    return client.create_experiment(name, artifact_location=local_artifact_root(uri, name))


IMPORT_EXPERIMENT = "kdscale-imports"


def log_import(uri: str, experiment: str, manifest: Manifest, cache_uri: str, params: dict, metrics: dict) -> str:
    """An import as a finished MLflow run (stage ``import``): its parameters, what it found in
    the source's values, the cache as its output dataset and the manifest; returns the run id.
    Lineage finds it as the cache's writer, with the imported source as the cache's origin."""
    from mlflow import MlflowClient
    from mlflow.entities import DatasetInput, InputTag, Metric, Param

    os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
    client = MlflowClient(uri)
    tags = {JOB_TAG: f"import-{manifest.cache_id[:8]}", STAGE_TAG: "import", CACHE_ID_TAG: manifest.cache_id}
    run_id = client.create_run(
        experiment_id(client, uri, experiment), run_name=f"import-{params['format']}", tags={**tags, **owner_tags()}
    ).info.run_id
    try:
        now = int(time.time() * 1000)
        client.log_batch(
            run_id,
            params=[Param(k, redact_text(str(v))[:6000]) for k, v in params.items()],
            metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items() if v is not None],
        )
        dataset = _cache_dataset(manifest, cache_uri)._to_mlflow_entity()
        client.log_inputs(run_id, datasets=[DatasetInput(dataset, [InputTag(DATASET_CONTEXT, "output")])])
        client.log_dict(run_id, redact(manifest.model_dump(mode="json")), MANIFEST_ARTIFACT)
        client.set_terminated(run_id, "FINISHED")
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    return run_id


class OneCallAtATime:
    """A client whose calls run one at a time. Students trained at once log from several threads,
    and MLflow's stores check, then insert: two students logging the same cache as their input
    raced to insert one dataset row (sqlite: ``UNIQUE constraint failed: datasets...``), and the
    student whose call lost failed."""

    def __init__(self, client: Any):
        self._client = client
        self._lock = threading.RLock()

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._client, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            with self._lock:
                return attr(*args, **kwargs)

        return call


class Tracker:
    """One job invocation's MLflow runs."""

    def __init__(self, spec: JobSpec, uri: str | None = None):
        from mlflow import MlflowClient

        # MLflow prints "View run ... at: <tracking URI>" itself, password included; kdscale's own
        # lines say where runs are, masked.
        os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
        self.uri = uri or tracking_uri(spec)
        self.client = OneCallAtATime(MlflowClient(self.uri))
        self.spec = spec
        self.experiment_id = experiment_id(self.client, self.uri, spec.experiment_name())
        self.parent_id: str | None = None

    def start_job(self, command: str) -> str:
        self.fail_abandoned_runs()
        run = self.client.create_run(
            self.experiment_id,
            run_name=f"{self.spec.name}-{command}",
            tags={JOB_TAG: self.spec.name, STAGE_TAG: "job", **owner_tags()},
        )
        self.parent_id = run.info.run_id
        self.client.log_dict(self.parent_id, redact(self.spec.model_dump(mode="json")), "job_spec.json")
        return self.parent_id

    def start_child(self, name: str, stage: str, tags: dict[str, str] | None = None) -> str:
        all_tags = {JOB_TAG: self.spec.name, STAGE_TAG: stage, **owner_tags(), **redact(tags or {})}
        if self.parent_id:
            all_tags[PARENT_TAG] = self.parent_id
        return self.client.create_run(self.experiment_id, run_name=name, tags=all_tags).info.run_id

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        flat = {k: redact_text("" if v is None else str(v))[:6000] for k, v in params.items()}
        self.client.log_batch(run_id, params=[Param(k, v) for k, v in flat.items()])

    def log_metrics(self, run_id: str, metrics: dict[str, float | None], step: int = 0) -> None:
        log_step_metrics(self.uri, run_id, metrics, step, self.client)

    def log_cache(self, run_id: str, manifest: Manifest, cache_uri: str, context: str) -> None:
        from mlflow.entities import DatasetInput, InputTag

        dataset = _cache_dataset(manifest, cache_uri)
        self.client.log_inputs(
            run_id, datasets=[DatasetInput(dataset._to_mlflow_entity(), [InputTag(DATASET_CONTEXT, context)])]
        )
        self.client.set_tag(run_id, CACHE_ID_TAG, manifest.cache_id)

    def log_manifest(self, run_id: str, manifest: Manifest) -> None:
        """The manifest beside the run, so lineage still answers when the cache itself is gone."""
        self.client.log_dict(run_id, redact(manifest.model_dump(mode="json")), MANIFEST_ARTIFACT)

    def log_figure(self, run_id: str, figure, path: str) -> None:
        self.client.log_figure(run_id, figure, path)

    def register(self, run_id: str, export_uri: str, student: str, tags: dict[str, str]):
        """Register the exported student (see :mod:`kdscale.tracking.registry`); None when the
        spec turns registration off."""
        from kdscale.tracking.registry import register_export

        if not self.spec.tracking.register_models:
            return None
        name = self.spec.tracking.registered_name(self.spec.name, student)
        all_tags = {JOB_TAG: self.spec.name, STUDENT_TAG: student, **redact(tags)}
        return register_export(
            self.client, run_id, export_uri, name, all_tags, description=f"Student {student} of job {self.spec.name}"
        )

    def end(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status)

    def fail_abandoned_runs(self) -> list[str]:
        """Mark FAILED this job's runs left RUNNING by a process of this host that no longer
        exists (a SIGKILLed job cannot end its own runs); runs of live or other hosts' processes
        are left alone."""
        runs = self.client.search_runs(
            [self.experiment_id],
            f"tags.`{JOB_TAG}` = '{self.spec.name}' and attributes.status = 'RUNNING'",
            max_results=1000,
        )
        failed = []
        for run in runs:
            tags = run.data.tags
            if tags.get(HOST_TAG) == host() and not alive(tags.get(PID_TAG)):
                self.client.set_tag(run.info.run_id, "kdscale.ended_by", "a later invocation: its process had died")
                self.client.set_terminated(run.info.run_id, "FAILED")
                failed.append(run.info.run_id)
        return failed


def owner_tags() -> dict[str, str]:
    """Which process owns a run, so a later invocation can tell an abandoned run from a live one."""
    return {HOST_TAG: host(), PID_TAG: str(os.getpid())}


def log_step_metrics(uri: str, run_id: str, metrics: dict[str, float | None], step: int, client=None) -> None:
    """Log metrics (None values skipped); training workers (rank 0) call it with just the URI to
    stream per-step losses into the student run the driver created."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    values = [Metric(k, float(v), now, step) for k, v in metrics.items() if v is not None]
    if values:
        (client or MlflowClient(uri)).log_batch(run_id, metrics=values)


class NullTracker(Tracker):
    """A Tracker that records nothing: the Python API's ``tracking=False`` (no MLflow needed).
    Run ids are ``None``; students train, evaluate and export as with tracking, unregistered."""

    def __init__(self, spec: JobSpec):  # no client, no experiment
        self.uri = None
        self.spec = spec
        self.parent_id = None

    def start_job(self, command: str) -> str:
        return None

    def start_child(self, name: str, stage: str, tags: dict[str, str] | None = None) -> str:
        return None

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        return None

    def log_metrics(self, run_id: str, metrics: dict[str, float | None], step: int = 0) -> None:
        return None

    def log_cache(self, run_id: str, manifest: Manifest, cache_uri: str, context: str) -> None:
        return None

    def log_manifest(self, run_id: str, manifest: Manifest) -> None:
        return None

    def log_figure(self, run_id: str, figure, path: str) -> None:
        pass

    def register(self, run_id: str, export_uri: str, student: str, tags: dict[str, str]):
        return None

    def end(self, run_id: str, status: str = "FINISHED") -> None:
        return None
