"""MLflow lineage: a parent run per job invocation, child runs per stage, and the cache as an
MLflow dataset whose digest is the cache_id — the key that links teacher -> cache -> students.

We use ``MlflowClient`` with explicit run ids rather than MLflow's fluent, process-global "active
run", because stages nest and training workers log into a run the driver created.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from typing import Any

from kdscale.cache.format import Manifest
from kdscale.config import JobSpec

CACHE_ID_TAG = "kdscale.cache_id"
STAGE_TAG = "kdscale.stage"
JOB_TAG = "kdscale.job"
PARENT_TAG = "mlflow.parentRunId"
DATASET_CONTEXT = "mlflow.data.context"


def tracking_uri(spec: JobSpec | None = None) -> str:
    """MLFLOW_TRACKING_URI wins, then the spec, then a sqlite file in the current directory."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    if spec is not None and spec.tracking.uri:
        return spec.tracking.uri
    return f"sqlite:///{os.path.abspath('mlflow.db')}"


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
        source = resolve_dataset_source(cache_uri)
    return LogitCacheDataset(source=source, name=f"kdscale-cache-{manifest.cache_id[:8]}", digest=manifest.cache_id, schema=schema)


class Tracker:
    """One job invocation's MLflow runs."""

    def __init__(self, spec: JobSpec, uri: str | None = None):
        from mlflow import MlflowClient

        self.uri = uri or tracking_uri(spec)
        self.client = MlflowClient(self.uri)
        self.spec = spec
        experiment = self.client.get_experiment_by_name(spec.experiment_name())
        self.experiment_id = (
            experiment.experiment_id if experiment else self.client.create_experiment(spec.experiment_name())
        )
        self.parent_id: str | None = None

    def start_job(self, command: str) -> str:
        run = self.client.create_run(
            self.experiment_id, run_name=f"{self.spec.name}-{command}", tags={JOB_TAG: self.spec.name, STAGE_TAG: "job"}
        )
        self.parent_id = run.info.run_id
        self.client.log_dict(self.parent_id, self.spec.model_dump(mode="json"), "job_spec.json")
        return self.parent_id

    def start_child(self, name: str, stage: str, tags: dict[str, str] | None = None) -> str:
        all_tags = {JOB_TAG: self.spec.name, STAGE_TAG: stage, **(tags or {})}
        if self.parent_id:
            all_tags[PARENT_TAG] = self.parent_id
        return self.client.create_run(self.experiment_id, run_name=name, tags=all_tags).info.run_id

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        flat = {k: ("" if v is None else str(v))[:6000] for k, v in params.items()}
        self.client.log_batch(run_id, params=[Param(k, v) for k, v in flat.items()])

    def log_metrics(self, run_id: str, metrics: dict[str, float | None], step: int = 0) -> None:
        log_step_metrics(self.uri, run_id, metrics, step, self.client)

    def log_cache(self, run_id: str, manifest: Manifest, cache_uri: str, context: str) -> None:
        from mlflow.entities import DatasetInput, InputTag

        dataset = _cache_dataset(manifest, cache_uri)
        self.client.log_inputs(run_id, datasets=[DatasetInput(dataset._to_mlflow_entity(), [InputTag(DATASET_CONTEXT, context)])])
        self.client.set_tag(run_id, CACHE_ID_TAG, manifest.cache_id)

    def end(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status)


def log_step_metrics(uri: str, run_id: str, metrics: dict[str, float | None], step: int, client=None) -> None:
    """Log metrics (None values skipped); training workers (rank 0) call it with just the URI to
    stream per-step losses into the student run the driver created."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    values = [Metric(k, float(v), now, step) for k, v in metrics.items() if v is not None]
    if values:
        (client or MlflowClient(uri)).log_batch(run_id, metrics=values)
