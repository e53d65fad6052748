"""Cache once, train many: 3 students from one cache (precompute included) against 3 online-KD
runs of the same students (the teacher inside every training worker). (issue 6)

Both arms run kdscale's real pipeline end to end on the SmolLM2 teacher and the same Python-docs
slice, same students, epochs and batch sizes; wall time of each whole job. Prints one JSON line;
``ratio`` = online seconds / cache seconds (goal >= 2.5), and each arm's held-out CE per student.

    .venv/bin/python benchmarks/multi_student.py [--tokens 16384] [--epochs 3] [--smoke]

``--smoke`` trains only the first student in each arm (on the tiny job).
"""

from __future__ import annotations

import json
import tempfile
import time

from common import quickstart, run, start_ray, training_args

STUDENTS = [
    {"name": "d128-l2"},
    {
        "name": "d96-l2",
        "architecture": {
            "hidden_size": 96,
            "num_attention_heads": 3,
            "num_key_value_heads": 1,
            "intermediate_size": 384,
        },
    },
    {"name": "d128-l1", "architecture": {"num_hidden_layers": 1}},
]


def main(argv: list[str] | None = None) -> None:
    args = training_args(__doc__, epochs=3, argv=argv)
    start_ray(2)
    chosen = STUDENTS[:1] if args.smoke else STUDENTS
    arms = {}
    for targets in ("cache", "online"):
        students = [{**s, "targets": targets, "train": {"epochs": args.epochs}} for s in chosen]
        spec = quickstart(args.smoke, **{"corpus.max_tokens": args.tokens, "students": students})
        with tempfile.TemporaryDirectory() as tmp:
            started = time.perf_counter()
            summary = run(spec, tmp)
            seconds = time.perf_counter() - started
        arms[targets] = {
            "seconds": seconds,
            "heldout_ce": {n: round(st["heldout_ce"], 4) for n, st in summary["students"].items()},
            "train_seconds": {n: round(st["train_seconds"], 1) for n, st in summary["students"].items()},
        }
    ratio = arms["online"]["seconds"] / arms["cache"]["seconds"]
    print(
        json.dumps(
            {
                "benchmark": "multi_student",
                "tokens": args.tokens,
                "epochs": args.epochs,
                "students": [s["name"] for s in chosen],
                "arms": arms,
                "ratio": ratio,
                "ratio_meaning": "wall time of 3 online-KD students / 3 students from one cache, precompute included",
                "goal": {"ratio_min": 2.5},
                "goal_met": ratio >= 2.5,
            }
        )
    )


if __name__ == "__main__":
    main()
