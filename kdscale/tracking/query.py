"""Read lineage back out of MLflow: what ``kdscale lineage`` prints.

From a registered model version: student run -> cache (URI, cache_id, manifest summary) ->
the precompute run that wrote it -> teacher (name, fingerprint) -> corpus (sources, content
hash). From a cache: every student trained on it, in any experiment, with its registered
versions. Only MLflow records and the cache's manifest are read; nothing is recomputed.
"""

from __future__ import annotations

import re
from typing import Any

from kdscale.cache.format import Manifest
from kdscale.tracking.lineage import (
    CACHE_ID_TAG,
    CONTENT_HASH_TAG,
    JOB_TAG,
    MANIFEST_ARTIFACT,
    STAGE_TAG,
    STUDENT_TAG,
    TEACHER_TAG,
    TOKENIZER_TAG,
)

CACHE_ID = re.compile(r"^[0-9a-f]{32}$")


class LineageError(LookupError):
    """The model, version or cache asked about is not recorded in this tracking store."""


def _search_runs(client, filter_string: str) -> list:
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs, token = [], None
    while experiments:
        page = client.search_runs(
            experiments,
            filter_string=filter_string,
            max_results=1000,
            page_token=token,
            order_by=["attributes.start_time ASC"],
        )
        runs += list(page)
        token = page.token
        if not token:
            break
    return runs


def _versions(client, filter_string: str) -> list:
    return sorted(client.search_model_versions(filter_string), key=lambda v: int(v.version))


def _run_summary(client, run) -> dict[str, Any]:
    tags, data = run.data.tags, run.data
    return {
        "run_id": run.info.run_id,
        "run_name": run.info.run_name,
        "experiment": client.get_experiment(run.info.experiment_id).name,
        "job": tags.get(JOB_TAG),
        "status": run.info.status,
        "started": run.info.start_time,
        "parent_run_id": tags.get("mlflow.parentRunId"),
        "metrics": {
            k: v
            for k, v in data.metrics.items()
            if k.startswith(("heldout/", "validation/"))
            or k in ("tokens", "bytes_per_token", "tokens_per_second", "reused", "train/tokens_per_second")
        },
    }


def _manifest(client, cache_uri: str | None, precompute_run_id: str | None) -> tuple[Manifest | None, str]:
    """The cache's manifest from the cache itself, else the copy logged with its precompute run."""
    from kdscale.cache.reader import open_manifest

    if cache_uri:
        try:
            return open_manifest(cache_uri), "cache"
        except Exception:  # moved, deleted or unreachable: fall back to the logged copy
            pass
    if precompute_run_id:
        import mlflow.artifacts

        try:
            raw = mlflow.artifacts.load_dict(f"runs:/{precompute_run_id}/{MANIFEST_ARTIFACT}")
            return Manifest.model_validate(raw), "mlflow artifact"
        except Exception:
            pass
    return None, "unavailable"


WRITER_STAGES = ("precompute", "import")  # the stages whose runs write caches


def precompute_run(client, cache_id: str):
    """The run that wrote the cache — a precompute, or an import of another tool's outputs — not
    one that found it already there and reused it."""
    runs = [
        run
        for stage in WRITER_STAGES
        for run in _search_runs(client, f"tags.`{CACHE_ID_TAG}` = '{cache_id}' and tags.`{STAGE_TAG}` = '{stage}'")
    ]
    writers = [r for r in runs if r.data.metrics.get("reused", 0.0) == 0.0 and r.info.status == "FINISHED"]
    return (writers or runs or [None])[0]


def _cache_block(client, cache_id: str, cache_uri: str | None) -> dict[str, Any]:
    from kdscale.cache.profile import describe

    writer = precompute_run(client, cache_id)
    m, found_in = _manifest(client, cache_uri, writer.info.run_id if writer else None)
    block: dict[str, Any] = {
        "cache": {"uri": cache_uri, "cache_id": cache_id, "manifest_from": found_in},
        "precompute_run": _run_summary(client, writer) if writer else None,
    }
    if m is None:
        return block
    if m.cache_id != cache_id:
        block["cache"]["warning"] = f"the cache now at {cache_uri} is another cache ({m.cache_id})"
        return block
    summary = describe(m)
    block["cache"]["manifest"] = {
        k: summary[k]
        for k in (
            "kind",
            "params",
            "rows",
            "tokens",
            "bytes_per_token",
            "mean_ids_per_position",
            "teacher_heldout_ce",
            "seq_len",
            "created_at",
            "format_version",
        )
    }
    imported = m.teacher.source.get("imported")
    block["teacher"] = {
        "name": m.teacher.name,
        "fingerprint": m.teacher.fingerprint,
        "dtype": m.teacher.dtype,
        "source": {k: v for k, v in m.teacher.source.items() if k != "imported"},
    }
    if imported:  # another tool made the targets: where they came from, and what the import found
        block["origin"] = {k: imported.get(k) for k in ("format", "uri", "files", "config", "quality")}
    block["tokenizer"] = {"fingerprint": m.tokenizer.fingerprint, "vocab_size": m.tokenizer.vocab_size}
    block["corpus"] = {
        "patterns": m.dataset.patterns,
        "sources": m.dataset.sources,
        "documents": m.dataset.documents,
        "content_hash": m.dataset.content_hash,
        "tokens": m.dataset.tokens,
    }
    return block


def model_lineage(client, ref: str) -> dict[str, Any]:
    """``MODEL`` (latest version) or ``MODEL/VERSION`` -> the whole chain back to the corpus."""
    name, _, version = ref.partition("/")
    versions = _versions(client, f"name = '{name}'")
    if not versions:
        raise LineageError(f"no registered model named {name!r} in this tracking store")
    if not version:
        mv = versions[-1]
    else:
        matching = [v for v in versions if str(v.version) == version]
        if not matching:
            raise LineageError(
                f"model {name!r} has no version {version} (versions: {', '.join(str(v.version) for v in versions)})"
            )
        mv = matching[0]
    run = client.get_run(mv.run_id)
    tags = {**run.data.tags, **mv.tags}
    student = _run_summary(client, run)
    student["student"] = tags.get(STUDENT_TAG)
    student["params"] = {
        k: v
        for k, v in run.data.params.items()
        if k in ("init", "targets", "parameters")
        or k.startswith(("loss.", "arch."))
        or k in ("train.epochs", "train.num_workers", "train.zero_stage", "train.lr")
    }
    out: dict[str, Any] = {
        "model": {
            "name": mv.name,
            "version": str(mv.version),
            "source": mv.source,
            "run_id": mv.run_id,
            "tags": dict(mv.tags),
        },
        "student_run": student,
    }
    cache_id = tags.get(CACHE_ID_TAG)
    if cache_id:
        out.update(_cache_block(client, cache_id, tags.get("kdscale.cache_uri") or run.data.params.get("cache_uri")))
        out["checks"] = _consistency(mv.tags, out)
    else:  # trained online: no cache, the teacher ran in the workers
        out["cache"] = None
        out["teacher"] = {"name": run.data.params.get("teacher"), "fingerprint": tags.get(TEACHER_TAG)}
        out["corpus"] = {"content_hash": tags.get(CONTENT_HASH_TAG)}
    return out


def _consistency(version_tags: dict[str, str], out: dict[str, Any]) -> list[str]:
    """Fingerprints on the model version against the manifest: any difference is a broken chain."""
    problems = []
    for tag, have in (
        (TEACHER_TAG, out.get("teacher", {}).get("fingerprint")),
        (TOKENIZER_TAG, out.get("tokenizer", {}).get("fingerprint")),
        (CONTENT_HASH_TAG, out.get("corpus", {}).get("content_hash")),
    ):
        want = version_tags.get(tag)
        if want and have and want != have:
            problems.append(f"{tag}: model version says {want}, cache manifest says {have}")
    return problems


def cache_lineage(client, cache: str) -> dict[str, Any]:
    """Every student trained from a cache (given as its URI or its cache_id)."""
    from kdscale import fs
    from kdscale.cache.reader import open_manifest

    cache_uri = None
    if CACHE_ID.match(cache):
        cache_id = cache
    else:
        cache_uri = fs.normalize(cache)
        try:
            cache_id = open_manifest(cache_uri).cache_id
        except Exception as e:
            raise LineageError(f"cannot read the cache at {cache} ({e}); pass its cache_id instead") from None
    block = _cache_block(client, cache_id, cache_uri)
    students = []
    for run in _search_runs(client, f"tags.`{CACHE_ID_TAG}` = '{cache_id}' and tags.`{STAGE_TAG}` = 'student'"):
        entry = _run_summary(client, run)
        entry["student"] = run.data.tags.get(STUDENT_TAG)
        entry["registered"] = [
            {"name": v.name, "version": str(v.version)} for v in _versions(client, f"run_id = '{run.info.run_id}'")
        ]
        students.append(entry)
    if not students and block["precompute_run"] is None:
        raise LineageError(f"no run in this tracking store wrote or used cache {cache_id}")
    return {**block, "students": students}
