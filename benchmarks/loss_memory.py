"""Peak memory of the KD loss (forward + backward) against plain cross-entropy, at vocab 49,152.

Each arm runs in its own subprocess: allocate the student logits ([positions, vocab], requiring
grad) and the targets, note the resident memory, run loss + backward, and read the process's peak
resident memory (ru_maxrss). The arm's cost is peak - baseline: what the loss itself needed, the
gradient of the logits included. Arms: plain CE; kdscale's chunked KD (sampled-style sparse
targets, 16 ids per position, alpha = 0.5 so CE is inside too); the same with one chunk covering
every position (unchunked). Prints one JSON line; ``ratio`` = chunked KD / CE (goal <= 1.25).

    .venv/bin/python benchmarks/loss_memory.py [--positions 4096] [--vocab 49152] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# --smoke: a small vocab and few positions, chunked in 4 (so the chunked arm is not the unchunked one)
SMOKE = {"positions": 256, "vocab": 512, "chunk": 64}


def arm(name: str, positions: int, vocab: int, chunk: int) -> dict:
    import resource

    import psutil
    import torch

    sys.path.insert(0, str(REPO))
    from kdscale.cache.reader import SparseTargets
    from kdscale.models.task import next_token_labels
    from kdscale.student.losses import cross_entropy, distillation_loss

    torch.set_num_threads(2)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, positions, vocab, generator=g).requires_grad_(True)
    ids = torch.randint(0, vocab, (1, positions), generator=g)
    targets = SparseTargets(
        torch.randint(0, vocab, (1, positions, 16), generator=g), torch.full((1, positions, 16), 1 / 16)
    )
    base = psutil.Process().memory_info().rss
    if name == "ce":
        loss = cross_entropy(logits, ids)
    else:
        loss = distillation_loss(
            logits, next_token_labels(ids), targets, alpha=0.5, temperature=1.0, chunk_positions=chunk
        ).total
    loss.backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"arm": name, "peak_bytes": peak - base, "logits_bytes": logits.numel() * 4, "loss": float(loss)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--positions", type=int, default=4096)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--chunk", type=int, default=1024, help="chunk_positions of the chunked arm (the spec default)")
    ap.add_argument("--arm", help=argparse.SUPPRESS)
    ap.add_argument(
        "--smoke", action="store_true", help="smoke test: " + ", ".join(f"--{k} {v}" for k, v in SMOKE.items())
    )
    args = ap.parse_args(argv)
    if args.smoke:
        args.positions, args.vocab, args.chunk = SMOKE["positions"], SMOKE["vocab"], SMOKE["chunk"]
    if args.arm:
        chunk = args.positions if args.arm == "kd_unchunked" else args.chunk
        print(json.dumps(arm(args.arm, args.positions, args.vocab, chunk)))
        return
    results = {}
    for name in ("ce", "kd_chunked", "kd_unchunked"):
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--arm",
                name,
                "--positions",
                str(args.positions),
                "--vocab",
                str(args.vocab),
                "--chunk",
                str(args.chunk),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        results[name] = json.loads(out.stdout.strip().splitlines()[-1])
    ce, kd = results["ce"]["peak_bytes"], results["kd_chunked"]["peak_bytes"]
    print(
        json.dumps(
            {
                "benchmark": "loss_memory",
                "positions": args.positions,
                "vocab": args.vocab,
                "chunk_positions": args.chunk,
                "peak_mib": {k: round(v["peak_bytes"] / 2**20, 1) for k, v in results.items()},
                "logits_mib": round(results["ce"]["logits_bytes"] / 2**20, 1),
                "ratio": kd / ce,
                "ratio_meaning": "peak memory of chunked KD (+CE, alpha 0.5) / plain CE, forward + backward",
                "unchunked_ratio": results["kd_unchunked"]["peak_bytes"] / ce,
                "goal": {"ratio_max": 1.25},
                "goal_met": kd / ce <= 1.25,
            }
        )
    )


if __name__ == "__main__":
    main()
