"""The workdir's record of a job: ``summary.json`` (each stage merges its part in) and the report
files (``kdscale report``: report.json / .md / .png, also logged to the job's MLflow parent run)."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from kdscale import fs
from kdscale.cache.format import Manifest

SUMMARY = "summary.json"
REPORT_FILES = ("report.json", "report.md", "report.png")  # in the workdir and the parent run's report/


def utc(seconds: float) -> str:
    """Seconds since the epoch as ISO 8601 UTC to the second: how summaries and job listings give times."""
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat(timespec="seconds")


def read_summary(workdir: str) -> dict[str, Any]:
    uri = fs.join(workdir, SUMMARY)
    return fs.read_json(uri) if fs.exists(uri) else {}


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def write_summary(workdir: str, update: dict[str, Any]) -> dict[str, Any]:
    """Merge ``update`` into summary.json (nested dicts merge, so stages add to each other)."""
    summary = _merge(read_summary(workdir), update)
    fs.write_json(fs.join(workdir, SUMMARY), summary)
    return summary


def cache_summary(cache_uri: str, m: Manifest, reused: bool | None = None) -> dict[str, Any]:
    t = m.totals
    return {
        "uri": cache_uri,
        "cache_id": m.cache_id,
        "target_kind": m.targets.kind,
        "tokens": t["tokens"],
        "rows": t["rows"],
        "bytes": t["bytes"],
        "bytes_per_token": t["bytes_per_token"],
        "target_bytes_per_token": t["target_bytes_per_token"],
        "teacher_heldout_ce": t["teacher_heldout_ce"],
        "teacher_validation_ce": t.get("teacher_validation_ce"),
        "rows_by_split": m.dataset.rows,
        **({} if reused is None else {"reused": reused}),
    }


def write_report(summary: dict[str, Any], baseline: str | None = None) -> dict[str, Any]:
    """Every student beside its baseline (:mod:`kdscale.report`): report.json / .md / .png in the workdir."""
    import io

    from kdscale.report import build_report, curves, markdown
    from kdscale.tracking import plots

    report = build_report(summary, baseline)
    figure = plots.student_curves(
        curves(summary),
        f"job {report['job']}: held-out CE by student",
        report["baseline"],
        report["teacher_heldout_ce"],
    )
    png = io.BytesIO()
    figure.savefig(png, format="png", dpi=110)
    json_name, md_name, png_name = REPORT_FILES
    fs.write_json(fs.join(summary["workdir"], json_name), report)
    fs.write_bytes(fs.join(summary["workdir"], md_name), markdown(report).encode())
    fs.write_bytes(fs.join(summary["workdir"], png_name), png.getvalue())
    return report


def log_report(workdir: str, tracking: str, run_id: str) -> None:
    """The workdir's report files under ``report/`` of an MLflow run (the job's parent run)."""
    import tempfile
    from pathlib import Path

    from mlflow import MlflowClient

    with tempfile.TemporaryDirectory() as tmp:
        for name in REPORT_FILES:
            (Path(tmp) / name).write_bytes(fs.read_bytes(fs.join(workdir, name)))
        MlflowClient(tracking).log_artifacts(run_id, tmp, "report")
