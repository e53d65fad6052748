"""One cache, a student with another tokenizer: does the teacher still help? (issue 18)

The long regime of benchmarks/quality.py (SmolLM2-135M teacher, its 49,152-token vocabulary; the
32k-token Python-docs slice; sampled N=50 cache; 26 epochs of 84 training rows), but the student
reads its own byte-level BPE, trained here on the slice's training rows (8,192 tokens: an
independent tokenizer, as a student from another model family has). Its rows are the cached text
re-tokenized (``students[].tokenizer``; at most STUDENT_LEN tokens per row), aligned to the
teacher's positions by byte boundaries. Arms, each the same student, init, seed and steps:

- ``own_ce``: hard labels only (alpha 0): the twin without the teacher;
- ``own_hybrid``: alpha 0.5, KL on ids whose bytes match across the vocabularies, ULD on the rest;
- ``own_uld``: alpha 0.5, ULD only (sorted probability vectors; Boizard et al. 2024).

alpha 0.5 is set beforehand (Boizard et al. train with CE plus the distillation term), not chosen
on any split. Per-token CE cannot be compared across tokenizers, so arms are compared in held-out
**bits per byte** of text (validation bits/byte beside it, for choosing); the teacher-tokenizer
students of the long study are put beside them in bits/byte, computed from their committed
held-out CE and the held-out split's bytes.

Each arm's result is ``docs/results/cross_tokenizer/<arm>[-seed<s>].json`` (committed as it lands
with ``--commit``); finished arms are never rerun, so an interrupted run continues.

    .venv/bin/python benchmarks/cross_tokenizer.py [--seeds 0 1 2] [--commit]
    .venv/bin/python benchmarks/cross_tokenizer.py --report     # from the committed files only
    .venv/bin/python benchmarks/cross_tokenizer.py --smoke      # tiny job, one arm pair

It prints one JSON line: per arm held-out and validation bits/byte, CE per own token, the aligned
fraction, steps and tokens; and the goal: the best cross-tokenizer recipe (by validation bits/byte)
beats its CE twin in bits/byte in every seed.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import quality
import yaml
from common import add_smoke, commit_file, git_head, kdscale_run, set_dotted

REGIME = "cross_tokenizer"
VOCAB = 8192
STUDENT_LEN = 384  # the slice's 256-token rows re-tokenized with the 8k BPE: ~1.2x as many tokens
ARMS = {
    "own_ce": {"alpha": 0.0},
    "own_hybrid": {"alpha": 0.5, "cross_tokenizer": "hybrid"},
    "own_uld": {"alpha": 0.5, "cross_tokenizer": "uld"},
}
TEACHER_TOKENIZER_ARMS = ("sampled", "ce_only")  # the long study's, shown in bits/byte beside these


def cache_uri(out: Path) -> Path:
    """The long regime's sampled cache (the same cache_id as the quality study's)."""
    return out / "long" / "sampled" / "work" / "cache"


def ensure_cache(out: Path, setup: quality.Setup) -> Path:
    """Precompute the long regime's sampled cache unless it is committed already."""
    uri = cache_uri(out)
    if (uri / "manifest.json").exists():
        return uri
    folder = out / REGIME / "_cache"
    folder.mkdir(parents=True, exist_ok=True)
    job = folder / "job.yaml"
    spec = quality.job_spec("long", "sampled", out, 0, setup)
    job.write_text(yaml.safe_dump(spec, sort_keys=False))
    kdscale_run(
        job,
        folder / "work",
        f"sqlite:///{folder / 'mlflow.db'}",
        folder / "log.txt",
        "cache",
        setup.in_process,
        "precompute",
    )
    return uri


def train_tokenizer(out: Path, cache: Path, vocab: int) -> Path:
    """A byte-level BPE trained on the cache's training rows only (their text, decoded exactly)."""
    from kdscale.cache.reader import load_token_bytes, open_manifest, read_split
    from kdscale.data.bpe import train_bpe

    dest = out / REGIME / f"bpe-{vocab}"
    if (dest / "tokenizer.json").exists():
        return dest
    manifest = open_manifest(str(cache))
    pieces = load_token_bytes(str(cache), manifest)
    rows = read_split(str(cache), manifest, "train").column("input_ids").to_pylist()
    texts = [pieces.row_bytes(r).decode("utf-8", errors="replace") for r in rows]
    train_bpe(texts, vocab, str(dest))
    return dest


def arm_spec(arm: str, out: Path, seed: int, tokenizer: Path, setup: quality.Setup, student_len: int) -> dict:
    """The long regime's sampled-cache job with the student reading its own tokenizer."""
    spec = quality.job_spec("long", "sampled", out, seed, setup)
    spec["name"] = f"cross-tokenizer-{quality.run_name(arm, seed)}"
    set_dotted(spec, "students.0.tokenizer", str(tokenizer))
    set_dotted(spec, "students.0.seq_len", student_len)
    for key, value in ARMS[arm].items():
        set_dotted(spec, f"students.0.loss.{key}", value)
    return spec


def run_arm(
    arm: str, out: Path, results: Path, seed: int, tokenizer: Path, setup: quality.Setup, commit: bool, student_len: int
) -> dict:
    done = quality.result_path(results, REGIME, arm, seed)
    if done.exists():
        return json.loads(done.read_text())
    folder = out / REGIME / quality.run_name(arm, seed)
    folder.mkdir(parents=True, exist_ok=True)
    job = folder / "job.yaml"
    job.write_text(yaml.safe_dump(arm_spec(arm, out, seed, tokenizer, setup, student_len), sort_keys=False))
    print(f"{REGIME}/{quality.run_name(arm, seed)}: running", file=sys.stderr, flush=True)
    started = time.perf_counter()
    kdscale_run(job, folder / "work", f"sqlite:///{folder / 'mlflow.db'}", folder / "log.txt", arm, setup.in_process)
    summary = json.loads((folder / "work" / "summary.json").read_text())
    st = summary["students"]["student"]
    result = {
        "regime": REGIME,
        "arm": arm,
        "seed": seed,
        **{k: st.get(k) for k in ("bits_per_byte", "validation_bits_per_byte", "teacher_bits_per_byte")},
        **{k: st.get(k) for k in ("heldout_ce", "validation_ce", "aligned_fraction", "steps", "train_seconds")},
        "alpha": ARMS[arm]["alpha"],
        "method": ARMS[arm].get("cross_tokenizer"),
        "tokenizer_vocab": VOCAB,
        "student_len": student_len,
        "train_tokens": sum(e["tokens"] for e in st["epochs"]),
        "resumed_at_epochs": st.get("resumed_at_epochs", []),
        "curve": [(e["tokens"], e["heldout_ce"]) for e in st["evals"]],
        "bytes_per_token": summary["cache"]["bytes_per_token"],
        "seconds": time.perf_counter() - started,
        "code": git_head(),
    }
    done.parent.mkdir(parents=True, exist_ok=True)
    done.write_text(json.dumps(result, indent=1) + "\n")
    print(f"{REGIME}/{quality.run_name(arm, seed)}: {result['bits_per_byte']:.4f} bits/byte", file=sys.stderr)
    if commit:
        commit_file(done, f"Cross-tokenizer benchmark: {quality.run_name(arm, seed)} result")
    return result


def teacher_tokenizer_bits(results: Path, cache: Path | None) -> dict[str, float]:
    """The long study's teacher-tokenizer students in held-out bits/byte: CE (nats per labelled
    position) x positions / (ln 2 x the bytes those positions' labels cover), over the same rows."""
    if cache is None or not (cache / "manifest.json").exists():
        return {}
    from kdscale.cache.reader import load_token_bytes, open_manifest, read_split
    from kdscale.data.alignment import teacher_label_bytes

    manifest = open_manifest(str(cache))
    pieces = load_token_bytes(str(cache), manifest)
    rows = read_split(str(cache), manifest, "heldout").column("input_ids").to_pylist()
    positions = sum(len(r) - 1 for r in rows)
    label_bytes = sum(teacher_label_bytes(r, pieces) for r in rows)
    found = quality.load_results(results).get("long", {})
    return {
        arm: statistics.fmean(r["heldout_ce"] for r in found[arm] if r["seed"] in (0, 1, 2))
        * positions
        / (math.log(2) * label_bytes)
        for arm in TEACHER_TOKENIZER_ARMS
        if arm in found
    }


def summarise(results: Path, cache: Path | None) -> dict:
    arms = quality.load_results(results).get(REGIME, {})
    table = {}
    for arm, runs in arms.items():
        bits = [r["bits_per_byte"] for r in runs]
        table[arm] = {
            "seeds": [r["seed"] for r in runs],
            "bits_per_byte": statistics.fmean(bits),
            "bits_per_byte_sd": statistics.stdev(bits) if len(bits) > 1 else None,
            "validation_bits_per_byte": statistics.fmean(r["validation_bits_per_byte"] for r in runs),
            "heldout_ce_own_tokens": statistics.fmean(r["heldout_ce"] for r in runs),
            "aligned_fraction": runs[0]["aligned_fraction"],
            "steps": runs[0]["steps"],
            "train_tokens": runs[0]["train_tokens"],
        }
    line: dict = {
        "benchmark": "cross_tokenizer",
        "arms": table,
        "teacher_tokenizer_bits_per_byte": teacher_tokenizer_bits(results, cache),
    }
    kd = [a for a in arms if a != "own_ce"]
    if kd and "own_ce" in arms:
        best = min(kd, key=lambda a: table[a]["validation_bits_per_byte"])
        twin = {r["seed"]: r["bits_per_byte"] for r in arms["own_ce"]}
        per_seed = [
            (r["seed"], 100 * (r["bits_per_byte"] / twin[r["seed"]] - 1)) for r in arms[best] if r["seed"] in twin
        ]
        line.update(
            best_cross_recipe=best,
            best_vs_own_ce_pct_by_seed=per_seed,
            goal_beats_ce_twin_every_seed=all(d < 0 for _, d in per_seed) if per_seed else None,
        )
    teacher = next((r for runs in arms.values() for r in runs if r.get("teacher_bits_per_byte")), None)
    line["teacher_bits_per_byte"] = teacher["teacher_bits_per_byte"] if teacher else None
    return line


def benchmark(
    out: Path,
    results: Path,
    setup: quality.Setup,
    seeds: list[int],
    commit: bool,
    arms: list[str],
    vocab: int,
    student_len: int,
) -> dict:
    cache = ensure_cache(out, setup)
    tokenizer = train_tokenizer(out, cache, vocab)
    for seed in seeds:
        for arm in arms:
            run_arm(arm, out, results, seed, tokenizer, setup, commit, student_len)
    return summarise(results, cache)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=quality.REPO / "runs" / "quality-benchmark")
    ap.add_argument("--results", type=Path, default=quality.RESULTS)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--commit", action="store_true", help="git-commit each result file as it lands")
    ap.add_argument("--report", action="store_true", help="only summarise the committed result files")
    add_smoke(ap)
    args = ap.parse_args(argv)
    if args.report:
        print(json.dumps(summarise(args.results.resolve(), cache_uri(args.out.resolve()))))
        return
    if args.smoke:
        with tempfile.TemporaryDirectory(prefix="cross-smoke-") as tmp:
            setup = quality.smoke_setup(Path(tmp) / "inputs")
            line = benchmark(
                Path(tmp) / "runs", Path(tmp) / "results", setup, [0], False, ["own_ce", "own_hybrid"], 300, 96
            )
    else:
        order = ["own_ce", "own_hybrid", "own_uld"]
        line = benchmark(
            args.out.resolve(),
            args.results.resolve(),
            quality.REAL,
            sorted(set(args.seeds)),
            args.commit,
            order,
            VOCAB,
            STUDENT_LEN,
        )
    print(json.dumps(line))


if __name__ == "__main__":
    sys.exit(main())
