"""Does streaming the cache slow training down? (issue 6's throughput benchmark)

Trains the quickstart student twice from the same SmolLM2 cache with kdscale's real path (Ray
Train, 2 workers x DeepSpeed ZeRO-2): once streaming the cache every epoch (Ray Data read +
target decoding, the default), once with ``train.preload`` (each worker decodes its share once
and keeps the targets in memory). Throughput is tokens/s over epochs 2..E (epoch 1 of the
preloaded run includes the loading). Prints one JSON line; ``ratio`` = streaming / in-memory
(goal >= 0.90).

    .venv/bin/python benchmarks/train_throughput.py [--tokens 16384] [--epochs 4] [--smoke]
"""

from __future__ import annotations

import json

from common import start_ray, train_rates, training_args


def main(argv: list[str] | None = None) -> None:
    args = training_args(__doc__, epochs=4, argv=argv)
    start_ray(2)
    students = [
        {"name": "streaming", "train": {"epochs": args.epochs}},
        {"name": "preloaded", "train": {"epochs": args.epochs, "preload": True}},
    ]
    summary, rates = train_rates(students, args.tokens, args.smoke)
    print(
        json.dumps(
            {
                "benchmark": "train_throughput",
                "tokens": summary["cache"]["tokens"],
                "epochs": args.epochs,
                "tokens_per_second": rates,
                "epoch_seconds": {
                    n: [round(e["seconds"], 2) for e in st["epochs"]] for n, st in summary["students"].items()
                },
                "data_wait_seconds": {
                    n: [round(e["data_seconds"], 2) for e in st["epochs"]] for n, st in summary["students"].items()
                },
                "first_batch_wait_seconds": {
                    n: [round(e["first_batch_seconds"], 2) for e in st["epochs"]]
                    for n, st in summary["students"].items()
                },
                "ratio": rates["streaming"] / rates["preloaded"],
                "ratio_meaning": "training tokens/s streaming the cache "
                "/ with targets preloaded in memory (epochs 2..E)",
                "goal": {"ratio_min": 0.90},
                "goal_met": rates["streaming"] / rates["preloaded"] >= 0.90,
            }
        )
    )


if __name__ == "__main__":
    main()
