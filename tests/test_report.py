"""`kdscale report`: every student beside its baseline, from summary.json alone; the validation
split it reports beside held-out; and the quality benchmark's --report from result files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kdscale.cli import app
from kdscale.report import ReportError, build_report, curves, paired_difference, pick_baseline, verdict
from tests.conftest import TINY_STUDENT_ARCH, write_job

REPO = Path(__file__).resolve().parent.parent


def _student(ce: float, alpha: float, rows: list[float], tokens: int = 1000) -> dict:
    return {
        "heldout_ce": ce,
        "validation_ce": ce + 0.01,
        "perplexity": 2.718**ce,
        "top1_agreement": 0.1,
        "teacher_heldout_ce": 2.0,
        "loss": {"alpha": alpha},
        "targets": "cache",
        "init": "config",
        "heldout_row_ce": rows,
        "train_tokens": tokens,
        "train_seconds": 10.0,
        "steps": 4,
        "evals": [{"step": 2, "tokens": tokens // 2, "heldout_ce": ce + 1}],
    }


SUMMARY = {
    "job": "j",
    "workdir": "/w",
    "cache": {"cache_id": "c" * 32, "bytes_per_token": 27.5},
    "students": {
        "kd": _student(5.0, 0.5, [4.9, 5.0, 5.1, 5.0]),  # 0.2 below the twin on every row
        "ce": _student(5.2, 0.0, [5.1, 5.2, 5.3, 5.2]),
        "close": _student(5.19, 1.0, [5.3, 5.1, 5.4, 4.96]),  # mixed per row
    },
}


def test_baseline_is_the_only_student_without_the_teacher():
    assert pick_baseline(SUMMARY["students"], None) == "ce"
    assert pick_baseline(SUMMARY["students"], "kd") == "kd"
    with pytest.raises(ReportError, match="no student named 'nope'"):
        pick_baseline(SUMMARY["students"], "nope")
    two_ce = {"a": _student(1, 0.0, []), "b": _student(1, 0.0, [])}
    assert pick_baseline(two_ce, None) is None  # ambiguous: must be named


def test_students_of_different_tokenizers_are_compared_in_bits_per_byte():
    """Per-token CE of two tokenizers is not comparable: Δ is taken in held-out bits per byte,
    paired per row, and the markdown says so; the same tokenizer keeps Δ in CE."""
    from kdscale.report import markdown

    own = {**_student(6.0, 0.5, [6.0] * 4), "tokenizer": "/t/bpe-8k", "bits_per_byte": 2.0, "aligned_fraction": 0.9}
    own["heldout_row_bits_per_byte"] = [1.9, 2.0, 2.1, 2.0]
    twin = {**_student(6.5, 0.0, [6.5] * 4), "tokenizer": "/t/bpe-8k", "bits_per_byte": 2.4, "aligned_fraction": 0.9}
    twin["heldout_row_bits_per_byte"] = [2.3, 2.4, 2.5, 2.4]
    teacher_tok = {**_student(5.0, 1.0, [5.0] * 4), "bits_per_byte": 1.8}
    teacher_tok["heldout_row_bits_per_byte"] = [1.7, 1.8, 1.9, 1.8]
    summary = {**SUMMARY, "students": {"own": own, "twin": twin, "teacher-tok": teacher_tok}}
    rows = {r["student"]: r for r in build_report(summary)["students"]}
    assert rows["own"]["delta_unit"] == "CE" and rows["own"]["delta"] == pytest.approx(-0.5)
    assert rows["teacher-tok"]["delta_unit"] == "bits/byte"
    assert rows["teacher-tok"]["delta"] == pytest.approx(-0.6) and rows["teacher-tok"]["verdict"] == "better"
    text = markdown(build_report(summary))
    assert "-0.6000 ± 0.0000 bits/byte (-25.00%)" in text and "bpe-8k" in text and "90.0%" in text
    no_bits = {**teacher_tok, "bits_per_byte": None}
    row = build_report({**summary, "students": {"twin": twin, "x": no_bits}})["students"][1]
    assert row["verdict"] == "not comparable" and row["delta"] is None


def test_paired_difference_and_verdicts():
    mean, se = paired_difference([4.9, 5.0, 5.1, 5.0], [5.1, 5.2, 5.3, 5.2])
    assert mean == pytest.approx(-0.2) and se == pytest.approx(0.0, abs=1e-9)
    assert paired_difference([1.0], [2.0]) is None and paired_difference([1.0, 2.0], [1.0]) is None
    assert verdict(-0.2, 0.01) == "better" and verdict(0.2, 0.01) == "worse"
    assert verdict(-0.01, 0.01) == "within noise" and verdict(-0.2, None) == "no per-row scores"


def test_report_rows_golden():
    report = build_report(SUMMARY)
    rows = {r["student"]: r for r in report["students"]}
    assert report["baseline"] == "ce" and report["teacher_heldout_ce"] == 2.0
    assert rows["kd"]["delta"] == pytest.approx(-0.2) and rows["kd"]["delta_pct"] == pytest.approx(-100 * 0.2 / 5.2)
    assert rows["kd"]["verdict"] == "better" and rows["ce"]["verdict"] == "baseline"
    assert rows["close"]["verdict"] == "within noise"  # -0.01 with a per-row spread of ~0.1
    assert rows["kd"]["bytes_per_token"] == 27.5 and rows["ce"]["bytes_per_token"] is None  # no teacher bytes
    assert rows["ce"]["targets"] == "none (CE only)"
    assert curves(SUMMARY)["kd"] == [(500, 6.0), (1000, 5.0)]  # in-training points end at the final eval
    with pytest.raises(ReportError, match="no evaluated students"):
        build_report({"students": {}})


def test_report_table_keeps_one_line_per_student_when_written_to_a_log(tmp_path):
    """Outside a terminal (a Ray job's log, CI, a pipe) rich's default 80 columns cut the table's
    names and numbers into fragments stacked lines deep; kdscale writes logs 200 columns wide."""
    students = {f"llama-d128-l2-{name}": st for name, st in SUMMARY["students"].items()}
    (tmp_path / "summary.json").write_text(json.dumps({**SUMMARY, "workdir": str(tmp_path), "students": students}))
    out = subprocess.run(
        [sys.executable, "-m", "kdscale.cli", "report", str(tmp_path), "--baseline", "llama-d128-l2-ce"],
        capture_output=True,
        text=True,
        env={k: v for k, v in os.environ.items() if k != "COLUMNS"},
        cwd=REPO,
    )
    assert out.returncode == 0, out.stderr
    rows = [line for line in out.stdout.splitlines() if line.startswith("│")]
    assert len(rows) == 3, out.stdout  # one line per student
    assert all("llama-d128-l2-" in row for row in rows) and "within noise" in out.stdout


@pytest.mark.ray
@pytest.mark.slow
def test_report_of_a_job_with_a_ce_twin(ray_session, tmp_path, mlflow_uri):
    """The tiny job with a validation split, a distilled student and its CE-only twin: the run ends
    with the report (files in the workdir and on the MLflow parent run); `kdscale report` re-makes
    it with any baseline; validation CE sits beside held-out CE."""
    write_job(tmp_path)
    twin = {
        "name": "twin",
        "architecture": {**TINY_STUDENT_ARCH, "num_hidden_layers": 2},
        "loss": {"alpha": 0.0},
        "train": {
            "num_workers": 2,
            "cpus_per_worker": 0.5,
            "epochs": 3,
            "micro_batch_size": 4,
            "lr": 3.0e-3,
            "checkpoint_every_epochs": 2,
        },
    }
    job = write_job(
        tmp_path,
        **{
            "corpus.validation_fraction": 0.15,
            "students.0.train.epochs": 3,
            "students.0.train.checkpoint_every_epochs": 2,
        },
    )
    import yaml

    spec = yaml.safe_load(job.read_text())
    spec["students"].append(twin)
    job.write_text(yaml.safe_dump(spec))
    workdir = tmp_path / "w"
    result = CliRunner().invoke(app, ["run", str(job), "--workdir", str(workdir)])
    assert result.exit_code == 0, result.output
    assert "students of job tiny vs baseline twin" in " ".join(result.output.split())  # the run ends with the table
    summary = json.loads((workdir / "summary.json").read_text())
    cache = summary["cache"]
    assert cache["rows_by_split"]["validation"] > 0 and cache["teacher_validation_ce"] > 0
    for st in summary["students"].values():
        assert st["validation_ce"] > 0 and len(st["heldout_row_ce"]) == st["rows"]
        # checkpoints after epochs 2 and 3 only (every 2, and the last)
        assert [e["epoch"] for e in st["epochs"] if "checkpoint_seconds" in e] == [1, 2]

    auto = json.loads((workdir / "report.json").read_text())
    assert auto["baseline"] == "twin" and (workdir / "report.png").stat().st_size > 1000
    out = CliRunner().invoke(app, ["report", str(workdir), "--baseline", "tiny-student", "--json"])
    assert out.exit_code == 0, out.output
    report = json.loads(out.output)
    rows = {r["student"]: r for r in report["students"]}
    kd, ce = summary["students"]["tiny-student"], summary["students"]["twin"]
    assert rows["twin"]["delta"] == pytest.approx(ce["heldout_ce"] - kd["heldout_ce"])
    assert rows["twin"]["verdict"] in ("better", "worse", "within noise")
    assert rows["tiny-student"]["verdict"] == "baseline"
    for key in (
        "heldout_ce",
        "validation_ce",
        "perplexity",
        "top1_agreement",
        "bytes_per_token",
        "train_tokens",
        "train_seconds",
        "delta_pct",
        "delta_se",
    ):
        assert key in rows["twin"]
    assert (
        rows["twin"]["bytes_per_token"] is None and rows["tiny-student"]["bytes_per_token"] == cache["bytes_per_token"]
    )
    assert rows["twin"]["train_tokens"] == rows["tiny-student"]["train_tokens"] > 0

    from mlflow import MlflowClient

    client = MlflowClient(mlflow_uri)
    parent = summary["mlflow"]["parent_run_id"]
    logged = {a.path for a in client.list_artifacts(parent, "report")}
    assert logged == {"report/report.json", "report/report.md", "report/report.png"}
    assert (
        json.loads(Path(client.download_artifacts(parent, "report/report.json", str(tmp_path))).read_text())["baseline"]
        == "tiny-student"
    )  # re-logged by `kdscale report --baseline`
    student_run = client.get_run(kd["mlflow_run_id"])
    assert student_run.data.metrics["validation/validation_ce"] == pytest.approx(kd["validation_ce"])

    bad = CliRunner().invoke(app, ["report", str(tmp_path / "nothing")])
    assert bad.exit_code == 2 and "no summary.json" in bad.output


def _result(arm: str, seed: int, heldout: float, validation: float, bpt: float | None) -> dict:
    return {
        "regime": "long",
        "arm": arm,
        "seed": seed,
        "heldout_ce": heldout,
        "validation_ce": validation,
        "other_genre_ce": heldout + 1,
        "top1_agreement": 0.1,
        "bytes_per_token": bpt,
        "alpha": 1.0,
        "targets": "x",
        "init": "config",
        "seconds": 100.0,
        "train_seconds": 90.0,
        "tokens_per_second": 1000.0,
        "train_tokens": 540672,
        "steps": 264,
        "curve": [[270336, heldout + 0.5], [540672, heldout]],
        "teacher_heldout_ce": 2.8,
        "teacher_validation_ce": 2.9,
        "rows_by_split": {},
        "cache_reused": False,
        "code": "abc",
    }


def test_quality_report_regenerates_from_result_files_alone(tmp_path):
    """--report reads only the result files: nothing runs (no teacher, no Ray), the table pairs
    differences by seed, and the goals follow from the numbers (decided only with the 3 seeds they
    name)."""
    results = tmp_path / "docs" / "results"
    (results / "long").mkdir(parents=True)
    runs = [
        _result("ce_only", 0, 5.0, 5.1, None),
        _result("ce_only", 1, 5.2, 5.3, None),
        _result("sampled", 0, 4.5, 4.6, 29.0),
        _result("sampled", 1, 4.6, 4.7, 29.0),
        _result("ce_only", 2, 5.1, 5.2, None),
        _result("sampled", 2, 4.9, 4.9, 29.0),
        _result("online_full", 0, 4.4, 4.5, None),
    ]
    for r in runs:
        (results / "long" / f"{r['arm']}{'' if r['seed'] == 0 else '-seed' + str(r['seed'])}.json").write_text(
            json.dumps(r)
        )
    (results / "_teacher_other_genre.json").write_text(json.dumps({"ce": 3.3}))
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "quality.py"), "--report", "--results", str(results)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    line = json.loads(proc.stdout.strip().splitlines()[-1])
    sampled = line["regimes"]["long"]["sampled"]
    assert sampled["vs_ce_only_by_seed"] == [
        [0, pytest.approx(-10.0)],
        [1, pytest.approx(100 * (4.6 / 5.2 - 1))],
        [2, pytest.approx(100 * (4.9 / 5.1 - 1))],
    ]
    assert sampled["vs_full_pct"] == pytest.approx(100 * (4.5 / 4.4 - 1))
    assert line["goals"]["best_cached"] == "sampled"
    assert line["goals"]["best_cached_beats_ce_by_5pct_every_seed"] is False  # seed 2: -3.9%
    md = (tmp_path / "docs" / "results.md").read_text()
    assert "| sampled | 3 |" in md and "Teacher CE on the other-genre text: 3.3000" in md
    assert (tmp_path / "docs" / "results.png").stat().st_size > 1000
    for f in (results / "long").glob("*-seed2.json"):
        f.unlink()
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "quality.py"), "--report", "--results", str(results)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    goals = json.loads(proc.stdout.strip().splitlines()[-1])["goals"]
    assert goals["best_cached_beats_ce_by_5pct_every_seed"] is None  # 2 of the 3 seeds: not decided
