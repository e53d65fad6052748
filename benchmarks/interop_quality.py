"""Students from caches as large as DistillKit's against one from kdscale's default cache, on the
same work (issue 16).

DistillKit's README recommends keeping the top 128 log-probs per position (documented at 328
bytes/token) and offers a budget setting keeping 50 (121 bytes/token). The arms here store exactly
that many log-probs, with their tail mass, in kdscale ``topk`` caches (no lossy polynomial fit, so
they are an upper bound on what a DistillKit cache of that k can teach), and train the long
regime's student of benchmarks/quality.py from each: the same teacher (SmolLM2-135M), 32k-token
Python-docs slice, 260 optimizer steps, seed, and validation / held-out / other-genre splits. The
third arm is kdscale's default recipe (kind and alpha of the config defaults), whose result the
quality study already holds.

Each arm's result is a file in docs/results/long/ (``topk128.json``, ``topk50.json``), committed as
it lands with ``--commit``; finished arms are never rerun.

    .venv/bin/python benchmarks/interop_quality.py [--commit]
    .venv/bin/python benchmarks/interop_quality.py --smoke   # the k = 128 and default arms, tiny job

It prints one JSON line: per arm the bytes/token (kdscale's measured; DistillKit's documented
figure), validation and held-out CE, and the goals: kdscale's default >= 10x smaller than the
k = 128 cache's documented DistillKit size, and its student at least as good (held-out CE).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import quality
from common import add_smoke

DISTILLKIT_BYTES = {"topk128": 328.0, "topk50": 121.0}  # DistillKit README: recommended, budget
ARMS = list(DISTILLKIT_BYTES)


def default_arm() -> str:
    """The quality study's arm that is kdscale's default recipe (config defaults)."""
    from kdscale.config import LossSpec, TargetsSpec

    targets, alpha = TargetsSpec(), LossSpec().alpha
    if targets.kind != "sampled" or targets.num_samples != 50:
        raise SystemExit(f"the default kind {targets.kind} has no arm in benchmarks/quality.py")
    return "sampled" if alpha == 1.0 else "sampled_alpha05" if alpha == 0.5 else f"alpha {alpha}"


def summarise(results: dict[str, dict], default: str) -> dict:
    arms: dict[str, dict] = {}
    for arm, r in results.items():
        arms[arm] = {
            "bytes_per_token": r["bytes_per_token"],
            "distillkit_documented_bytes_per_token": DISTILLKIT_BYTES.get(arm),
            "validation_ce": r["validation_ce"],
            "heldout_ce": r["heldout_ce"],
            "other_genre_ce": r["other_genre_ce"],
            "steps": r["steps"],
            "train_tokens": r["train_tokens"],
        }
    d, rec = results[default], results["topk128"]
    return {
        "benchmark": "interop_quality",
        "default_arm": default,
        "arms": arms,
        "default_vs_distillkit_recommended_bytes": DISTILLKIT_BYTES["topk128"] / d["bytes_per_token"],
        "default_vs_topk128_heldout_ce_pct": 100 * (d["heldout_ce"] / rec["heldout_ce"] - 1),
        "goal_10x_smaller": DISTILLKIT_BYTES["topk128"] / d["bytes_per_token"] >= 10,
        "goal_student_at_least_as_good": d["heldout_ce"] <= rec["heldout_ce"],
    }


def benchmark(out: Path, results: Path, setup: quality.Setup, commit: bool, arms: list[str]) -> dict:
    quality.teacher_other_genre_ce(results, setup)
    default = default_arm()
    done = {arm: quality.run_arm("long", arm, out, results, 0, commit, setup) for arm in [*arms, default]}
    return summarise(done, default)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=quality.REPO / "runs" / "quality-benchmark")
    ap.add_argument("--results", type=Path, default=quality.RESULTS)
    ap.add_argument("--commit", action="store_true", help="git-commit each result file as it lands")
    add_smoke(ap)
    args = ap.parse_args(argv)
    if args.smoke:
        with tempfile.TemporaryDirectory(prefix="interop-smoke-") as tmp:
            setup = quality.smoke_setup(Path(tmp) / "inputs")
            # k = 50 runs the same code as k = 128: the smoke run trains two students, not three
            line = benchmark(Path(tmp) / "runs", Path(tmp) / "results", setup, False, ["topk128"])
    else:
        line = benchmark(args.out.resolve(), args.results.resolve(), quality.REAL, args.commit, ARMS)
    print(json.dumps(line))


if __name__ == "__main__":
    sys.exit(main())
