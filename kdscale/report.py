"""Every student of a job beside its baseline: the answer to "did the teacher help?".

Built from the job's ``summary.json`` alone (no model is loaded), so it can be printed at the end
of a run, re-made later with ``kdscale report WORKDIR``, and logged to the job's MLflow parent run.

The baseline is a student trained without the teacher (``loss.alpha == 0``: the CE-only twin) when
the job has exactly one, or the one named with ``--baseline``. A difference is called *within
noise* unless it exceeds two standard errors of the paired per-row differences on the held-out
rows: both students are scored on the same rows, so the row-to-row variation of the text cancels
and what is left is how consistently one beats the other. That is evaluation noise only; another
seed of the same student moves its CE too (0.02-0.13 nats at 30-56 steps in docs/results-short.md),
which only several seeds measure (benchmarks/quality.py).

Students with different tokenizers predict different tokens, so their per-token CE cannot be
compared; there Δ is taken in held-out bits per byte of text (per row, paired alike), and the
table says which unit each Δ is in.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

NOISE_SE = 2.0  # |Δ| beyond this many paired standard errors is a difference, not noise


class ReportError(ValueError):
    """The summary cannot give the report asked for (no students, an unknown baseline)."""


def pick_baseline(students: dict[str, dict[str, Any]], requested: str | None) -> str | None:
    """The requested student, else the only one trained without the teacher (alpha 0), else None."""
    if requested is not None:
        if requested not in students:
            raise ReportError(f"no student named {requested!r} (students: {', '.join(students)})")
        return requested
    without_teacher = [n for n, s in students.items() if (s.get("loss") or {}).get("alpha") == 0]
    return without_teacher[0] if len(without_teacher) == 1 else None


def paired_difference(rows: list[float], base_rows: list[float]) -> tuple[float, float] | None:
    """Mean and standard error of the per-row CE differences (None without matching rows)."""
    if not rows or len(rows) != len(base_rows) or len(rows) < 2:
        return None
    diffs = [a - b for a, b in zip(rows, base_rows)]
    return statistics.fmean(diffs), statistics.stdev(diffs) / math.sqrt(len(diffs))


def verdict(delta: float, se: float | None) -> str:
    if se is None:
        return "no per-row scores"
    if abs(delta) <= NOISE_SE * se:
        return "within noise"
    return "better" if delta < 0 else "worse"


def _delta(st: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    """Δ vs the baseline in held-out CE, or in bits per byte when the tokenizers differ."""
    same_tokenizer = st.get("tokenizer") == base.get("tokenizer")
    key, rows, unit = ("heldout_ce", "heldout_row_ce", "CE")
    if not same_tokenizer:
        key, rows, unit = ("bits_per_byte", "heldout_row_bits_per_byte", "bits/byte")
    if st.get(key) is None or base.get(key) is None:
        return {"delta": None, "delta_pct": None, "delta_se": None, "delta_unit": unit, "verdict": "not comparable"}
    delta = st[key] - base[key]
    paired = paired_difference(st.get(rows) or [], base.get(rows) or [])
    se = paired[1] if paired else None
    return {
        "delta": delta,
        "delta_pct": 100 * delta / base[key],
        "delta_se": se,
        "delta_unit": unit,
        "verdict": "baseline" if st is base else verdict(delta, se),
    }


def student_row(name: str, st: dict[str, Any], cache: dict[str, Any], base: dict[str, Any] | None) -> dict[str, Any]:
    alpha = (st.get("loss") or {}).get("alpha")
    uses_cache = st.get("targets") == "cache" and alpha != 0
    row = {
        "student": name,
        "targets": "none (CE only)" if alpha == 0 else st.get("targets"),
        "alpha": alpha,
        "init": st.get("init"),
        "tokenizer": st.get("tokenizer"),
        "heldout_ce": st["heldout_ce"],
        "bits_per_byte": st.get("bits_per_byte"),
        "aligned_fraction": st.get("aligned_fraction"),
        "validation_ce": st.get("validation_ce"),
        "perplexity": st.get("perplexity"),
        "top1_agreement": st.get("top1_agreement"),
        "bytes_per_token": cache.get("bytes_per_token") if uses_cache else None,
        "train_tokens": st.get("train_tokens") or sum(e["tokens"] for e in st.get("epochs", [])),
        "train_seconds": st.get("train_seconds"),
        "steps": st.get("steps"),
    }
    if base is not None:
        row.update(_delta(st, base))
    return row


def build_report(summary: dict[str, Any], baseline: str | None = None) -> dict[str, Any]:
    students = summary.get("students") or {}
    trained = {n: s for n, s in students.items() if "heldout_ce" in s}
    if not trained:
        raise ReportError("the summary has no evaluated students; run `kdscale run` or `kdscale train` first")
    base_name = pick_baseline(trained, baseline)
    base = trained.get(base_name) if base_name else None
    cache = summary.get("cache") or {}
    rows = [student_row(n, s, cache, base) for n, s in trained.items()]
    teacher = next(iter(trained.values()))
    return {
        "job": summary.get("job"),
        "workdir": summary.get("workdir"),
        "baseline": base_name,
        "noise_rule": f"|Δ| > {NOISE_SE:g} standard errors of the paired per-row held-out CE differences",
        "teacher_heldout_ce": teacher.get("teacher_heldout_ce"),
        "teacher_validation_ce": teacher.get("teacher_validation_ce"),
        "teacher_bits_per_byte": teacher.get("teacher_bits_per_byte"),
        "cache_id": cache.get("cache_id"),
        "students": rows,
    }


def curves(summary: dict[str, Any]) -> dict[str, list[tuple[int, float]]]:
    """Held-out CE against training tokens per student: the in-training evaluations (with
    ``eval_every_steps``), ending at the final evaluation."""
    out = {}
    for name, st in (summary.get("students") or {}).items():
        if "heldout_ce" not in st:
            continue
        points = [(e["tokens"], e["heldout_ce"]) for e in st.get("evals") or []]
        total = st.get("train_tokens") or sum(e["tokens"] for e in st.get("epochs", []))
        if not points or points[-1][0] != total:
            points.append((total, st["heldout_ce"]))
        out[name] = points
    return out


def _fmt(value: Any, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def table_rows(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Column headers and formatted cells, shared by the console table and the markdown file."""
    has_base = report["baseline"] is not None
    own = any(r.get("tokenizer") for r in report["students"])  # some student has its own tokenizer
    headers = ["student", "targets", "α"] + (["tokenizer"] if own else [])
    headers += ["held-out CE", "bits/byte", "validation CE", "perplexity", "top-1 agree"]
    headers += ["aligned"] if own else []
    headers += ["Δ vs " + report["baseline"], "verdict"] if has_base else []
    headers += ["B/token", "train tokens", "train s"]
    cells = []
    for r in report["students"]:
        row = [r["student"], str(r["targets"]), _fmt(r["alpha"], "g")]
        row += [_tokenizer_cell(r.get("tokenizer"))] if own else []
        row += [
            _fmt(r["heldout_ce"], ".4f"),
            _fmt(r.get("bits_per_byte"), ".4f"),
            _fmt(r["validation_ce"], ".4f"),
            _fmt(r["perplexity"], ".1f"),
            _fmt(r["top1_agreement"], ".3f"),
        ]
        row += [_fmt(r.get("aligned_fraction"), ".1%")] if own else []
        if has_base:
            row += [_delta_cell(r), r["verdict"]]
        row += [_fmt(r["bytes_per_token"], ".1f"), _fmt(r["train_tokens"], ","), _fmt(r["train_seconds"], ".0f")]
        cells.append(row)
    return headers, cells


def _teacher_bits(report: dict[str, Any]) -> str:
    bits = report.get("teacher_bits_per_byte")
    return "" if bits is None else f" ({bits:.4f} bits/byte)"


def _tokenizer_cell(path: str | None) -> str:
    return "teacher's" if not path else path.rstrip("/").rsplit("/", 1)[-1]


def _delta_cell(r: dict[str, Any]) -> str:
    if r["verdict"] == "baseline" or r.get("delta") is None:
        return "–"
    se = "" if r.get("delta_se") is None else f" ± {2 * r['delta_se']:.4f}"
    unit = "" if r.get("delta_unit", "CE") == "CE" else " bits/byte"
    return f"{r['delta']:+.4f}{se}{unit} ({r['delta_pct']:+.2f}%)"


def markdown(report: dict[str, Any]) -> str:
    headers, cells = table_rows(report)
    lines = [f"# Students of job {report['job']}", "", "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    lines += [
        "",
        f"Teacher held-out CE {_fmt(report['teacher_heldout_ce'], '.4f')}"
        f"{_teacher_bits(report)}. Δ: held-out CE minus the baseline's (in bits per byte between students "
        f"of different tokenizers; ± two paired standard errors); a verdict is given when {report['noise_rule']}.",
        "",
    ]
    return "\n".join(lines)
