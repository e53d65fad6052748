"""Distillation beyond language models: Hinton et al.'s image sanity case on Fashion-MNIST.

1. Trains a ResNet teacher on the 60,000 training images with a plain torch loop (kdscale
   distils teachers; it does not pre-train them) and saves it as a Hugging Face folder with its
   image processor (the normalisation it was trained with) — skipped when the folder already
   holds a teacher trained with the same settings.
2. Runs ``kdscale run jobs/fashion_mnist.yaml``: the teacher's class distribution at T=4 for all
   70,000 images goes into the Parquet cache (``full`` kind), and two identical small ResNet
   students train from it through Ray Train + DeepSpeed — ``scratch`` on the hard labels only
   (alpha 0), ``distilled`` mostly on the soft targets (alpha 0.9).
3. Prints one JSON line with the test errors (1 - accuracy on the official 10,000 test images)
   of teacher, scratch student and distilled student, and writes docs/fashion_mnist.md.

    .venv/bin/python benchmarks/fashion_mnist.py [--out runs/fashion-mnist] [--teacher-epochs 6]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from kdscale.data.images import read_idx  # noqa: E402
from kdscale.models.task import ImageClassification  # noqa: E402

DATA = Path("/usr/share/datasets/fashion-mnist")
JOB = REPO / "jobs" / "fashion_mnist.yaml"
DOCS = REPO / "docs"
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
TEACHER_ARCH = {"embedding_size": 32, "hidden_sizes": [32, 64, 128], "depths": [1, 1, 1]}


def load(split: str) -> tuple[np.ndarray, np.ndarray]:
    prefix = "train" if split == "train" else "t10k"
    return read_idx(str(DATA / f"{prefix}-images-idx3-ubyte.gz")), read_idx(str(DATA / f"{prefix}-labels-idx1-ubyte.gz"))


def train_teacher(folder: Path, epochs: int, seed: int = 0) -> dict:
    """A ResNet classifier trained on the hard labels; returns its settings and test error."""
    from transformers import ResNetConfig, ResNetForImageClassification

    settings = {"arch": TEACHER_ARCH, "epochs": epochs, "seed": seed, "batch": 128, "lr": 3e-3}
    marker = folder / "kdscale_teacher.json"
    if marker.exists() and json.loads(marker.read_text())["settings"] == settings:
        return json.loads(marker.read_text())
    torch.manual_seed(seed)
    torch.set_num_threads(os.cpu_count() or 1)
    x, y = load("train")
    tx, ty = load("test")
    mean, std = float(x.mean() / 255), float(x.std() / 255)
    task = ImageClassification((1, 28, 28), (mean,), (std,), CLASSES)
    inputs = task.model_inputs({"pixels": x.reshape(len(x), -1)})["pixel_values"]
    test_inputs = task.model_inputs({"pixels": tx.reshape(len(tx), -1)})["pixel_values"]
    labels = torch.from_numpy(y.astype(np.int64))
    config = ResNetConfig(num_channels=1, id2label=dict(enumerate(CLASSES)), label2id={c: i for i, c in enumerate(CLASSES)},
                          **TEACHER_ARCH)
    model = ResNetForImageClassification(config)
    steps = epochs * (len(x) // settings["batch"])
    opt = torch.optim.AdamW(model.parameters(), lr=settings["lr"], weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    started = time.perf_counter()
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(x))
        for i in range(len(x) // settings["batch"]):
            idx = order[i * settings["batch"] : (i + 1) * settings["batch"]]
            loss = model(pixel_values=inputs[idx], labels=labels[idx]).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        print(f"teacher epoch {epoch + 1}/{epochs}: last loss {loss.item():.3f}", file=sys.stderr)
    model.eval()
    with torch.inference_mode():
        predicted = torch.cat([model(pixel_values=b).logits.argmax(-1) for b in test_inputs.split(1000)])
    error = float((predicted.numpy() != ty).mean())
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    task.save_pretrained(str(folder))
    record = {"settings": settings, "test_error": error, "seconds": time.perf_counter() - started,
              "parameters": sum(p.numel() for p in model.parameters())}
    marker.write_text(json.dumps(record))
    return record


def write_doc(result: dict, summary: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    students = summary["students"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, colour in (("scratch", "C1"), ("distilled", "C0")):
        evals = students[name]["evals"]
        ax.plot([e["tokens"] for e in evals], [e["heldout_ce"] for e in evals], marker="o", markersize=3, color=colour,
                label=f"{name} (alpha {result[name]['alpha']})")
    ax.set(xlabel="training images seen", ylabel="test cross-entropy (nats)", title="Fashion-MNIST students")
    ax.legend(frameon=False)
    fig.tight_layout()
    DOCS.mkdir(exist_ok=True)
    fig.savefig(DOCS / "fashion_mnist.png", dpi=110)
    t, sc, di = result["teacher"], result["scratch"], result["distilled"]
    lines = [
        "# Fashion-MNIST: distilling an image classifier", "",
        "Generated by `.venv/bin/python benchmarks/fashion_mnist.py` (see its docstring). The teacher's class "
        "distribution at T = 4 goes through the same Parquet cache (`full` kind) and the two students through the "
        "same Ray Train + DeepSpeed path as the language models; the job is [jobs/fashion_mnist.yaml]"
        "(../jobs/fashion_mnist.yaml). Test = the official 10,000 test images; one seed.", "",
        "| model | parameters | test error | test errors (of 10,000) | test CE |", "|---|---|---|---|---|",
        f"| teacher (ResNet {TEACHER_ARCH['hidden_sizes']}) | {t['parameters']:,} | {100 * t['test_error']:.2f}% | "
        f"{round(t['test_error'] * 10000)} | – |",
    ]
    for name, r in (("student from scratch (alpha 0: hard labels)", sc), ("distilled student (alpha 0.9, T = 4)", di)):
        lines.append(f"| {name} | {r['parameters']:,} | {100 * r['test_error']:.2f}% | {round(r['test_error'] * 10000)} | "
                     f"{r['test_ce']:.4f} |")
    lines += ["", f"Distillation closes {100 * result['gap_closed']:.0f}% of the scratch student's error gap to the "
              f"teacher. Cache: {result['cache']['bytes_per_image']:.1f} bytes per image (pixels, label and 10 "
              "log-probs).", "", "![test cross-entropy of both students during training](fashion_mnist.png)", ""]
    (DOCS / "fashion_mnist.md").write_text("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "fashion-mnist")
    ap.add_argument("--teacher-epochs", type=int, default=6)
    args = ap.parse_args()
    out = args.out.resolve()
    teacher = train_teacher(out / "teacher", args.teacher_epochs)
    print(f"teacher: test error {teacher['test_error']:.4f}", file=sys.stderr)
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{out / 'mlflow.db'}"}
    cmd = [str(Path(sys.executable).with_name("kdscale")), "run", str(JOB), "--workdir", str(out / "work")]
    started = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    (out / "log.txt").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"kdscale run failed (exit {proc.returncode}); see {out / 'log.txt'}")
    summary = json.loads((out / "work" / "summary.json").read_text())
    students = summary["students"]
    from kdscale.config import load_job

    spec = {s.name: s for s in load_job(JOB).students}
    from kdscale.models.student import count_parameters
    from kdscale.pipeline import prepare

    prepared = prepare(load_job(JOB))
    result = {
        "teacher": {"test_error": 1 - students["distilled"]["teacher_accuracy"], "parameters": teacher["parameters"],
                    "test_error_own_eval": teacher["test_error"], "train_seconds": teacher["seconds"]},
        **{name: {"test_error": 1 - s["accuracy"], "test_ce": s["heldout_ce"], "alpha": spec[name].loss.alpha,
                  "parameters": count_parameters(prepared.student_configs[name], prepared.task),
                  "train_seconds": s["train_seconds"]}
           for name, s in students.items()},
        "cache": {"bytes_per_image": summary["cache"]["bytes_per_token"], "cache_id": summary["cache"]["cache_id"]},
        "job_seconds": time.perf_counter() - started,
    }
    gap = result["scratch"]["test_error"] - result["teacher"]["test_error"]
    result["gap_closed"] = (result["scratch"]["test_error"] - result["distilled"]["test_error"]) / gap if gap > 0 else 0.0
    result["ratio"] = result["distilled"]["test_error"] / result["scratch"]["test_error"]
    write_doc(result, summary)
    print(json.dumps({"fashion_mnist": result, "goal": "distilled test error below the scratch student's"}))


if __name__ == "__main__":
    main()
