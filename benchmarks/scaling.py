"""Training throughput with 2 Ray Train workers against 1 on this machine. (issue 6)

The quickstart student on the same cache, trained with kdscale's real path (DeepSpeed ZeRO-2 per
worker, gloo all-reduce), once with 1 worker and once with 2 (each worker one thread, the same
micro-batch). Tokens/s over epochs 2..E. Prints one JSON line; ``ratio`` = 2 workers / 1 (the
goal on a real cluster is near-linear; on a 2-core machine the workers also share the cores with
Ray Data and the driver).

    .venv/bin/python benchmarks/scaling.py [--tokens 16384] [--epochs 3] [--smoke]
"""

from __future__ import annotations

import json

from common import start_ray, train_rates, training_args


def main(argv: list[str] | None = None) -> None:
    args = training_args(__doc__, epochs=3, argv=argv)
    start_ray(2)
    students = [
        {"name": "one-worker", "train": {"epochs": args.epochs, "num_workers": 1, "cpus_per_worker": 1}},
        {"name": "two-workers", "train": {"epochs": args.epochs, "num_workers": 2, "cpus_per_worker": 0.5}},
    ]
    _, rates = train_rates(students, args.tokens, args.smoke)
    print(
        json.dumps(
            {
                "benchmark": "scaling",
                "tokens_per_second": rates,
                "ratio": rates["two-workers"] / rates["one-worker"],
                "ratio_meaning": "training tokens/s with 2 workers / 1 worker (epochs 2..E)",
                "cpus": 2,
            }
        )
    )


if __name__ == "__main__":
    main()
