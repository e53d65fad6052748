"""How much of a bare torch loop's speed does kdscale's training keep? (issue 12)

One run, two trainings of the quickstart student (Llama d=128 x 2, vocab 49,152) from the same
SmolLM2 cache, with the same global batch (8 x 256 tokens), the same loss (alpha 0.5 KD over the
cached sparse targets + CE), AdamW and the same threads (2):

- ``kdscale``: the real path, `kdscale`'s pipeline: Ray Train, 2 workers x 1 thread, DeepSpeed ZeRO-2,
  the cache streamed by Ray Data with batches prefetched across epochs, checkpoints as the
  student's spec says (default: every epoch);
- ``bare``: one process, 2 threads, the same batches decoded once into memory beforehand, a plain
  ``loss.backward(); optimizer.step()`` loop: the ceiling on this machine. It runs with the same
  malloc setting as kdscale's workers (huge pages; the script re-executes itself with it).

Rate = training tokens / wall seconds over epochs 2..E (epoch 1 carries start-up and warm-up), and for
kdscale it includes each epoch's data waits and checkpoint saves. Prints one JSON line; ``ratio`` =
kdscale / bare (goal >= 0.95). Also ``ratio_whole_run``: including Ray Train's and DeepSpeed's
one-time start-up (not a goal: it is fixed per job, not per token). Run it alone on the machine.

    .venv/bin/python benchmarks/train_vs_bare.py [--tokens 40960] [--epochs 4] [--workers 2] [--threads N]
        [--smoke]
"""

from __future__ import annotations

import json
import tempfile
import time

import torch
from common import quickstart, run, same_allocator_here, start_ray, training_args


def bare_loop(spec, summary: dict, epochs: int) -> dict:
    """The same student, batches and loss in a plain single-process loop; seconds per epoch."""
    from kdscale.cache.reader import batch_targets, load_rank_order, open_manifest, read_split
    from kdscale.models.student import build_student, student_config
    from kdscale.models.task import CausalLM, table_arrays
    from kdscale.student.engine import warmup_cosine
    from kdscale.student.loop import steps_per_epoch
    from kdscale.student.losses import distillation_loss
    from kdscale.teachers import load_teacher_config, load_tokenizer

    torch.set_num_threads(2)
    student = spec.students[0]
    cache_uri = summary["cache"]["uri"]
    manifest = open_manifest(cache_uri)
    order = load_rank_order(cache_uri, manifest)
    table = read_split(cache_uri, manifest, "train")
    task = CausalLM()
    tokenizer = load_tokenizer(spec.teacher)
    config = student_config(student, load_teacher_config(spec.teacher, len(tokenizer)), len(tokenizer))
    model = build_student(config, spec.seed)
    batch = student.train.micro_batch_size * student.train.num_workers  # kdscale's global batch
    steps = steps_per_epoch(manifest.dataset.rows["train"], student.train)
    decoded = []
    for i in range(steps):
        rows = table.slice(i * batch, batch)
        arrays = table_arrays(rows, task.input_columns)
        decoded.append((task.model_inputs(arrays), task.labels(arrays), batch_targets(rows, manifest, order, 0, 1.0)))
    optimizer = torch.optim.AdamW(model.parameters(), lr=student.train.lr, betas=(0.9, 0.95))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(steps * epochs, student.train.warmup_ratio))
    seconds = []
    for _ in range(epochs):
        started = time.perf_counter()
        for inputs, labels, targets in decoded:
            loss = distillation_loss(
                model(**inputs).logits,
                labels,
                targets,
                alpha=student.loss.alpha,
                temperature=student.loss.temperature,
                chunk_positions=student.loss.chunk_positions,
            ).total
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), student.train.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            schedule.step()
        seconds.append(time.perf_counter() - started)
    return {"epoch_seconds": seconds, "tokens_per_epoch": steps * batch * manifest.dataset.seq_len}


def main(argv: list[str] | None = None) -> None:
    args = training_args(__doc__, epochs=4, tokens=40960, workers=True, argv=argv)
    started_ray = start_ray(2)
    batch = 8  # the quickstart's global batch: 2 workers x 4 rows
    train = {
        "epochs": args.epochs,
        "eval_every_steps": 0,
        "num_workers": args.workers,
        "micro_batch_size": batch // args.workers,
        "threads_per_worker": args.threads,
    }
    spec = quickstart(
        args.smoke,
        shared_smoke_cache=True,
        **{"corpus.max_tokens": args.tokens, "students": [{"name": "student", "train": train}]},
    )
    with tempfile.TemporaryDirectory() as tmp:
        summary = run(spec, tmp)
        st = summary["students"]["student"]
        later = st["epochs"][1:] or st["epochs"]  # one epoch (--smoke): that one
        kd_seconds = sum(e["seconds"] + e.get("checkpoint_seconds", 0.0) for e in later)
        kd_rate = sum(e["tokens"] for e in later) / kd_seconds
        if started_ray:  # (a Ray this script did not start, a smoke test's, is left running)
            import ray

            ray.shutdown()  # the bare loop gets the machine to itself
        bare = bare_loop(spec, summary, args.epochs)
    bare_later = bare["epoch_seconds"][1:] or bare["epoch_seconds"]
    bare_rate = bare["tokens_per_epoch"] * len(bare_later) / sum(bare_later)
    kd_tokens = sum(e["tokens"] for e in st["epochs"])
    print(
        json.dumps(
            {
                "benchmark": "train_vs_bare",
                "tokens_per_epoch": bare["tokens_per_epoch"],
                "epochs": args.epochs,
                "workers": args.workers,
                "threads_per_worker": args.threads,
                "tokens_per_second": {"kdscale": kd_rate, "bare": bare_rate},
                "kdscale_epochs": [
                    {
                        k: round(e.get(k, 0.0), 2)
                        for k in ("seconds", "data_seconds", "first_batch_seconds", "checkpoint_seconds")
                    }
                    for e in st["epochs"]
                ],
                "bare_epoch_seconds": [round(s, 2) for s in bare["epoch_seconds"]],
                "ratio": kd_rate / bare_rate,
                "ratio_meaning": "kdscale training tokens/s "
                "(epochs 2..E, data waits and checkpoint saves included) / a bare "
                "single-process torch loop's on the same batches, loss and threads",
                "ratio_whole_run": (kd_tokens / st["train_seconds"])
                / (bare["tokens_per_epoch"] * args.epochs / sum(bare["epoch_seconds"])),
                "goal": {"ratio_min": 0.95},
                "goal_met": kd_rate / bare_rate >= 0.95,
            }
        )
    )


if __name__ == "__main__":
    same_allocator_here()  # as a script only: a caller's process (a test's) is never replaced
    main()
