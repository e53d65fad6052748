"""Register an exported student in the MLflow Model Registry.

The export (a Hugging Face folder: config, safetensors, tokenizer) is uploaded as the student
run's ``model/`` artifact first, and only then is a model version created — in one call that
carries all its lineage tags — so a failure at any point leaves either no version or a complete
one, never a version without files or without its cache_id. Load a version with
``mlflow.artifacts.download_artifacts("models:/<name>/<version>")`` and
``AutoModelForCausalLM.from_pretrained`` on the folder.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass

from kdscale import fs

MODEL_ARTIFACT = "model"


@dataclass(frozen=True)
class RegisteredVersion:
    name: str
    version: str
    source: str


def register_export(
    client, run_id: str, export_uri: str, name: str, tags: dict[str, str], description: str | None = None
) -> RegisteredVersion:
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode

    folder = fs.local_copy(export_uri)
    try:
        client.log_artifacts(run_id, folder, MODEL_ARTIFACT)
    finally:
        if folder != export_uri:
            shutil.rmtree(folder, ignore_errors=True)
    try:
        client.create_registered_model(name, description="Students distilled by kdscale.")
    except MlflowException as e:
        if e.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
            raise
    source = f"{client.get_run(run_id).info.artifact_uri.rstrip('/')}/{MODEL_ARTIFACT}"
    version = client.create_model_version(name, source=source, run_id=run_id, tags=tags, description=description)
    return RegisteredVersion(name, str(version.version), source)
