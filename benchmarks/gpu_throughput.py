"""How fast is kdscale on one GPU? (issue 17's GPU numbers)

Four arms on one CUDA device, over the same packed Python-docs rows:

- ``bare``: a plain loop of teacher forwards in one process (the job's dtype, batch and
  sequence length, CUDA-synchronized) — the ceiling;
- ``forward_extract``: the same loop with kdscale's target extraction of every row after its
  forward (no id coding, no writing; ``extraction_ratio`` = this / bare);
- ``precompute``: kdscale's precompute with one teacher replica on the GPU (``teacher.num_gpus:
  1``: the forward in bf16, target extraction in fp32 on the device, only the sparse targets
  moved to the host, then id coding, Parquet writes and the ledger on the CPU); ``ratio`` =
  precompute / bare;
- ``train``: the quickstart student trained from that cache by one Ray Train worker on the GPU
  (DeepSpeed ZeRO-2, bf16, NCCL), tokens/s over epochs 2..E.

Teacher: SmolLM2-135M-Instruct. ``--weights gguf`` loads the quickstart's GGUF; ``--weights
random`` builds the same architecture (30 layers, d576, vocab 49,152) with seeded random weights
and the tokenizer folder ``--tokenizer`` (the GGUF's, saved by transformers): a forward's speed
does not depend on the weights' values, and the GPU machine's 64 MiB transfer limit does not
carry the 94 MiB GGUF. Prints one JSON line. No goal is asserted: these are the numbers the
README records (with the date and the device).

    python benchmarks/gpu_throughput.py [--weights gguf|random] [--tokenizer DIR] [--corpus GLOB]
        [--tokens 1048576] [--batch-size 32] [--micro-batch 16] [--epochs 2] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from typing import Any

import numpy as np
import torch
from common import SMOKE_TOKENS, add_smoke, packed_rows, quickstart, run, start_ray, steady_rate

# SmolLM2-135M-Instruct's config (read from the GGUF by transformers 5.25).
SMOLLM2_ARCHITECTURE = {
    "model_type": "llama",
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"},
    "tie_word_embeddings": True,
}


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--weights", choices=["gguf", "random"], default="gguf")
    ap.add_argument("--tokenizer", help="tokenizer folder (--weights random)")
    ap.add_argument("--corpus", help="corpus glob (default: the quickstart's)")
    ap.add_argument("--tokens", type=int, default=1 << 20)
    ap.add_argument("--batch-size", type=int, default=32, help="teacher rows per forward")
    ap.add_argument("--micro-batch", type=int, default=16, help="student rows per step")
    ap.add_argument("--epochs", type=int, default=2)
    add_smoke(ap)
    args = ap.parse_args(argv)
    if args.weights == "random" and not args.tokenizer and not args.smoke:
        ap.error("--weights random needs --tokenizer")
    if args.smoke:
        args.tokens, args.epochs, args.batch_size, args.micro_batch = SMOKE_TOKENS, 1, 8, 4
    return args


def job(args: argparse.Namespace, cuda: bool):
    """The quickstart (smoke: the tiny job) on one GPU: one teacher replica, one training worker."""
    overrides: dict[str, Any] = {
        "corpus.max_tokens": args.tokens,
        "teacher.replicas": 1,
        "teacher.shards": 1,
        "teacher.num_gpus": 1 if cuda else 0,
        "teacher.dtype": "bfloat16" if cuda else "float32",
        "teacher.batch_size": args.batch_size,
        "students": [
            {
                "name": "gpu-student",
                "train": {
                    "use_gpu": cuda,
                    "num_workers": 1,
                    "cpus_per_worker": 1,
                    "precision": "bf16" if cuda else "auto",
                    "zero_stage": 2,
                    "epochs": args.epochs,
                    "micro_batch_size": args.micro_batch,
                },
            }
        ],
    }
    if args.corpus:
        overrides["corpus.paths"] = [args.corpus]
    if args.weights == "random" and not args.smoke:
        overrides.update(
            {
                "teacher.init": "random",
                "teacher.path": None,
                "teacher.gguf_file": None,
                "teacher.tokenizer": args.tokenizer,
                "teacher.architecture": SMOLLM2_ARCHITECTURE,
            }
        )
    return quickstart(args.smoke, check_resources=args.weights == "gguf", **overrides)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def forward_loops(spec, device: torch.device) -> tuple[dict, dict]:
    """Two timed passes of the teacher's forwards over the packed rows on ``device``: the forwards
    alone (``bare``), and each followed by kdscale's target extraction of its rows
    (``forward_extract``, kdscale.cache.targets as the teacher actor runs it, without id coding
    or writing): the gap between the three arms says where the precompute's time goes."""
    from kdscale import pipeline
    from kdscale.cache.targets import extract_row
    from kdscale.models.task import next_token_labels
    from kdscale.teachers import load_teacher

    tokenizer = pipeline.prepare(spec).tokenizer
    rows = packed_rows(spec, tokenizer)
    ids = torch.from_numpy(rows.astype(np.int64)).to(device)
    started = time.perf_counter()
    model = load_teacher(spec.teacher, len(tokenizer), spec.seed).to(device)
    load = time.perf_counter() - started
    t, vocab = spec.cache.targets, len(tokenizer)

    def extract(part: torch.Tensor) -> None:
        logits = model(input_ids=part).logits[..., :vocab].float()
        for i, labels in enumerate(next_token_labels(part)):
            extract_row(
                t.kind, logits[i], labels, temperature=t.temperature, num_samples=t.num_samples, k=t.k,
                seed=spec.seed, sid=str(i), store_logprobs=t.store_logprobs, draws=t.draws,
            )  # fmt: skip

    def timed(step) -> dict:
        with torch.inference_mode():
            step(ids[: spec.teacher.batch_size])  # warm-up (kernels, allocator), not timed
            sync(device)
            started = time.perf_counter()
            for part in ids.split(spec.teacher.batch_size):
                step(part)
            sync(device)
            seconds = time.perf_counter() - started
        return {"tokens": int(rows.size), "seconds": seconds, "tokens_per_second": rows.size / seconds}

    bare = {**timed(lambda part: model(input_ids=part)), "load_seconds": load}
    return bare, timed(extract)  # (the model is freed with this frame: main empties CUDA's cache)


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    spec = job(args, cuda)
    bare, forward_extract = forward_loops(spec, device)
    if cuda:
        torch.cuda.empty_cache()  # the teacher actor and the student get the whole GPU
    for arm, result in (("bare", bare), ("forward_extract", forward_extract)):  # kept if a later arm fails
        print(json.dumps({"arm": arm, **result}), file=sys.stderr, flush=True)
    start_ray(2 if args.smoke else 8)
    with tempfile.TemporaryDirectory() as tmp:
        precompute = run(spec, tmp, stages=("precompute",))["precompute"]
        print(json.dumps({"arm": "precompute", **precompute}), file=sys.stderr, flush=True)
        summary = run(spec, tmp, stages=("train",))
    student = summary["students"]["gpu-student"]
    print(
        json.dumps(
            {
                "benchmark": "gpu_throughput",
                "device": torch.cuda.get_device_name(device) if cuda else "cpu",
                "torch": torch.__version__,
                "teacher": spec.teacher.name,
                "weights": "smoke" if args.smoke else args.weights,
                "teacher_dtype": spec.teacher.dtype,
                "tokens": bare["tokens"],
                "seq_len": spec.corpus.seq_len,
                "teacher_batch_size": spec.teacher.batch_size,
                "target_kind": summary["cache"]["target_kind"],
                "bare": bare,
                "forward_extract": forward_extract,
                "precompute": precompute,
                "ratio": precompute["tokens_per_second"] / bare["tokens_per_second"],
                "ratio_meaning": "kdscale precompute tokens/s (1 GPU replica) / bare teacher-forward tokens/s",
                "extraction_ratio": forward_extract["tokens_per_second"] / bare["tokens_per_second"],
                "train": {
                    "tokens_per_second": steady_rate(student),
                    "micro_batch_size": args.micro_batch,
                    "epochs": len(student["epochs"]),
                    "precision": spec.students[0].train.precision,
                    "epoch_seconds": [round(e["seconds"], 2) for e in student["epochs"]],
                },
            }
        )
    )


if __name__ == "__main__":
    main()
