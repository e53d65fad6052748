"""Does precompute scale with the corpus? The driver's peak memory, the time to the first committed
shard and the tokens/s at 3M and 30M tokens of a synthetic corpus, laid out as a few large JSONL
files and as many small text files; a tiny random teacher (jobs/tiny.yaml's), so kdscale's own
costs dominate and the tokens/s is the most any real teacher replica could be fed.

The corpus: the Python docs' paragraphs (Debian python3.11-doc), reshuffled per seed and grouped
into documents of 20 paragraphs, written until the tiny tokenizer's token count reaches the size.
Each arm is a fresh process running kdscale's precompute with its own local Ray (so its peak RSS
is its own); the first shard is seen as the first ledger entry; tokens/s is end to end (Ray and
teacher start included). Prints one JSON line.

Goals (issue 15): driver peak RSS at 30M <= 1.2x at 3M; time to first shard at 30M <= 1.5x at
3M; tokens/s at 30M >= 0.9x at 3M; a single large file tokenized by more than one task.

Units are 4 MiB here, not kdscale's default 32 MiB, so that the 3M corpus is already several
units, as any corpus of billions of tokens is (the tiny tokenizer makes ~2 bytes/token). At 32 MiB
(measured 2026-12-03, kept under ``*-32MiB.json``) the 3M corpus was one unit and the 30M one two,
its 15.7 MB "large" files were smaller than a unit, so no file could be split, and the first
shard waited for one unit that was 2.5x larger at 30M (first shard 14.1 s -> 24.2 s, 1.72x): that
measured the unit size, not scaling.

The four arms take ~25 min on 2 cores; each finished arm is kept in
``docs/results/precompute_scale/<layout>-<size>-<unit>.json`` (``--commit``: and committed) with
the settings and the kdscale code it measured; a rerun measures only the arms missing for these
settings, and the ratios say whether all arms measured the same kdscale code.

    .venv/bin/python benchmarks/precompute_scale.py [--sizes 3000000 30000000] [--cpus 2] [--unit-bytes N] [--commit]
"""

from __future__ import annotations

import argparse
import glob
import json
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from common import TINY, add_smoke, commit_file, tiny_job  # noqa: E402

DOCS = "/usr/share/doc/python3.11/html/_sources/library/*.rst.txt"
PARAGRAPHS_PER_DOC = 20
LARGE_FILES = 4
RESULTS = REPO / "docs" / "results" / "precompute_scale"
UNIT_BYTES = 4 << 20  # (why: the module's docstring)


def precompute_arm(job: str, workdir: str) -> dict:
    """One arm's precompute through kdscale's API; the calling process's peak RSS (ru_maxrss, KiB
    on Linux) and the manifest's units. Run as ``python precompute_scale.py --arm JOB WORKDIR``."""
    import resource

    import kdscale

    started = time.time()
    cache = kdscale.precompute(kdscale.load_job(job), workdir=workdir, tracking=False)
    d = cache.manifest.dataset
    files: dict[str, int] = {}
    for u in d.units or []:
        for p in u.pieces:
            files[p["uri"]] = files.get(p["uri"], 0) + 1
    return {
        "started": started,
        "committed": time.time(),
        "tokens": d.tokens,
        "units": len(d.units or []),
        "max_units_per_file": max(files.values(), default=0),
        "dropped_tokens": d.dropped_tokens,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def paragraphs(pattern: str, fallback: str) -> list[str]:
    found = [p for f in sorted(glob.glob(pattern)) for p in Path(f).read_text(errors="replace").split("\n\n")]
    found = [p.strip() for p in found if p.strip()]
    if not found:  # (smoke runs on machines without the Debian docs: the tiny corpus's pages)
        found = [p.strip() for f in sorted(glob.glob(fallback)) for p in Path(f).read_text().split("\n\n") if p.strip()]
    return found


def documents(paras: list[str], tokens: int, tokenizer, seed: int):
    """Documents of reshuffled paragraphs until about ``tokens`` tokens (measured on the first ones)."""
    rng = random.Random(seed)
    sample = " ".join(paras[:200])
    per_char = len(tokenizer(sample, add_special_tokens=False)["input_ids"]) / max(len(sample), 1)
    chars, made = tokens / per_char, 0.0
    while made < chars:
        doc = "\n\n".join(rng.choice(paras) for _ in range(PARAGRAPHS_PER_DOC))
        made += len(doc)
        yield doc


def write_corpus(folder: Path, layout: str, docs) -> str:
    """The corpus as LARGE_FILES JSONL files (round robin) or one text file per document; its pattern."""
    folder.mkdir(parents=True)
    if layout == "large":
        outs = [open(folder / f"part-{i}.jsonl", "w") for i in range(LARGE_FILES)]
        for n, doc in enumerate(docs):
            outs[n % LARGE_FILES].write(json.dumps({"text": doc}) + "\n")
        for f in outs:
            f.close()
        return str(folder / "*.jsonl")
    for n, doc in enumerate(docs):
        (folder / f"doc-{n:07d}.txt").write_text(doc)
    return str(folder / "*.txt")


def first_shard_time(cache: Path, stop: threading.Event, found: dict) -> None:
    while not stop.is_set():
        if glob.glob(str(cache / "_ledger" / "*-00000.json")):
            found["at"] = time.time()
            return
        time.sleep(0.05)


def arm(tmp: Path, name: str, pattern: str, fmt: str, cpus: int, unit_bytes: int, in_process: bool) -> dict:
    """One precompute: its own process and Ray (``in_process``: this one's, for smoke runs)."""
    spec = tiny_job()
    spec["name"] = f"scale-{name}"
    spec["corpus"].update(paths=[pattern], format=fmt, max_tokens=None, unit_bytes=unit_bytes)
    spec["teacher"].update(replicas=cpus, num_cpus=1)
    spec["ray"] = {**spec.get("ray", {}), "num_cpus": cpus}
    job = tmp / f"{name}.json"
    job.write_text(json.dumps(spec))  # JSON is YAML
    workdir = tmp / f"work-{name}"
    stop, found = threading.Event(), {}
    watcher = threading.Thread(target=first_shard_time, args=(workdir / "cache", stop, found), daemon=True)
    watcher.start()
    if in_process:
        out = precompute_arm(str(job), str(workdir))
    else:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--arm", str(job), str(workdir)]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
        if proc.returncode != 0:
            raise SystemExit(f"precompute {name} failed:\n{proc.stderr[-3000:]}")
        out = json.loads(proc.stdout.strip().splitlines()[-1])
    stop.set()
    seconds = out["committed"] - out["started"]
    return {
        "tokens": out["tokens"],
        "units": out["units"],
        "max_units_per_file": out["max_units_per_file"],
        "dropped_tokens": out["dropped_tokens"],
        "driver_peak_rss_mb": out["peak_rss_mb"],
        "first_shard_seconds": found.get("at", out["committed"]) - out["started"],
        "seconds": seconds,
        "tokens_per_second": out["tokens"] / seconds,
        "tokens_per_second_per_cpu": out["tokens"] / seconds / cpus,
    }


def kdscale_code() -> str:
    """The git tree of kdscale/ (what an arm measured; unchanged by commits elsewhere, such as
    result files), with ``-dirty`` when it has uncommitted changes."""
    git = ["git", "-C", str(REPO)]
    tree = subprocess.run([*git, "rev-parse", "--short", "HEAD:kdscale"], capture_output=True, text=True)
    dirty = subprocess.run([*git, "diff", "--quiet", "HEAD", "--", "kdscale"]).returncode != 0
    return (tree.stdout.strip() or "unknown") + ("-dirty" if dirty else "")


def kept_arm(path: Path, settings: dict) -> dict | None:
    """A finished arm's result, if it was measured with these settings."""
    if not path.exists():
        return None
    kept = json.loads(path.read_text())
    return kept if kept.get("settings") == settings else None


def ratios(small: dict, large: dict) -> dict:
    return {
        "rss": large["driver_peak_rss_mb"] / small["driver_peak_rss_mb"],
        "first_shard": large["first_shard_seconds"] / small["first_shard_seconds"],
        "tokens_per_second": large["tokens_per_second"] / small["tokens_per_second"],
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs=2, default=[3_000_000, 30_000_000])
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--unit-bytes", type=int, default=UNIT_BYTES, help="corpus.unit_bytes (default 4 MiB)")
    ap.add_argument("--results", type=Path, default=RESULTS, help="where finished arms are kept")
    ap.add_argument("--commit", action="store_true", help="commit each finished arm's result file")
    ap.add_argument("--arm", nargs=2, metavar=("JOB", "WORKDIR"), help=argparse.SUPPRESS)
    add_smoke(ap)
    args = ap.parse_args(argv)
    if args.arm:
        print(json.dumps(precompute_arm(*args.arm)))
        return
    if args.smoke:
        args.sizes, args.unit_bytes = [4_000, 12_000], 8_192

    from kdscale.config import load_job
    from kdscale.teachers import load_tokenizer

    tokenizer = load_tokenizer(load_job(TINY).teacher)
    unit = f"{args.unit_bytes >> 20}MiB" if args.unit_bytes % (1 << 20) == 0 else f"{args.unit_bytes}B"
    paras = paragraphs(DOCS, str(REPO / "jobs" / "assets" / "tiny-corpus" / "*.rst"))
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        kept_in = tmp / "results" if args.smoke else args.results  # (a smoke run never touches docs/)
        for layout, fmt in (("large", "jsonl"), ("small", "text")):
            for size in args.sizes:
                name = f"{layout}-{size}"
                settings = {
                    "size": size,
                    "layout": layout,
                    "cpus": args.cpus,
                    "unit_bytes": args.unit_bytes,
                    "seed": args.seed,
                }
                path = kept_in / f"{name}-{unit}.json"
                results[name] = kept_arm(path, settings)
                if results[name] is None:
                    pattern = write_corpus(tmp / name, layout, documents(paras, size, tokenizer, args.seed))
                    measured = arm(tmp, name, pattern, fmt, args.cpus, args.unit_bytes, args.smoke)
                    results[name] = {**measured, "settings": settings, "code": kdscale_code()}
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_text(json.dumps(results[name], indent=1) + "\n")
                    if args.commit:
                        commit_file(path, f"precompute_scale benchmark: {name} arm")
    small, large = args.sizes
    r = {layout: ratios(results[f"{layout}-{small}"], results[f"{layout}-{large}"]) for layout in ("large", "small")}
    goals = {"rss_max": 1.2, "first_shard_max": 1.5, "tokens_per_second_min": 0.9}
    met = (
        all(
            v["rss"] <= goals["rss_max"]
            and v["first_shard"] <= goals["first_shard_max"]
            and v["tokens_per_second"] >= goals["tokens_per_second_min"]
            for v in r.values()
        )
        and results[f"large-{large}"]["max_units_per_file"] > 1
    )
    codes = sorted({a["code"] for a in results.values()})
    print(
        json.dumps(
            {
                "benchmark": "precompute_scale",
                "teacher": "tiny-random-llama",
                "cpus": args.cpus,
                "unit_bytes": args.unit_bytes,
                "sizes": args.sizes,
                "arms": results,
                "ratios": r,
                "ratio_meaning": f"each layout's {large}-token arm / its {small}-token arm",
                "one_large_file_by_several_tasks": results[f"large-{large}"]["max_units_per_file"] > 1,
                "kdscale_code": codes,
                "same_code": len(codes) == 1,
                "goal": goals,
                "goal_met": met and len(codes) == 1,
            }
        )
    )


if __name__ == "__main__":
    main()
