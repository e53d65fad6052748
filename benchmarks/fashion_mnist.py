"""Distillation beyond language models: Hinton et al.'s image sanity case on Fashion-MNIST.

1. Trains a ResNet teacher on the 60,000 training images with a plain torch loop (kdscale
   distils teachers; it does not pre-train them) and saves it as a Hugging Face folder with its
   image processor (the normalisation it was trained with) — skipped when the folder already
   holds a teacher trained with the same settings.
2. Runs ``kdscale run jobs/fashion_mnist.yaml``: the teacher's class distribution at T=4 for all
   70,000 images goes into the Parquet cache (``full`` kind), and two identical small ResNet
   students train from it through Ray Train + DeepSpeed — ``scratch`` on the hard labels only
   (alpha 0), ``distilled`` on soft targets and labels (the job's alpha and T: 0.5 and 1, chosen
   on the validation split by this benchmark's sweep).
   The same comparison is repeated for a larger ("medium") student from the same cache, and
   the medium student is retrained with other loss settings (alpha, T) from that cache (a
   ``full`` cache is re-tempered exactly) — ``--no-sweep`` skips that.
3. Prints one JSON line with the test errors (1 - accuracy on the official 10,000 test images)
   of teacher, scratch students and distilled students (``ratio``: distilled / scratch error),
   and writes docs/fashion_mnist.md and docs/fashion_mnist.png.

    .venv/bin/python benchmarks/fashion_mnist.py [--out runs/fashion-mnist] [--teacher-epochs 6]
        [--sizes small medium] [--no-sweep] [--smoke]

``--smoke`` runs the same steps on a synthetic stand-in of the four IDX files (300 + 100 noise
images) in a temp folder (the documents too): the teacher 1 epoch, the students 1 epoch, the small
size only unless ``--sizes`` says more, ``kdscale run`` in this process.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import struct
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from common import SMOKE_EPOCHS, add_smoke, kdscale_run  # noqa: E402

from kdscale.data.images import read_idx  # noqa: E402
from kdscale.models.task import ImageClassification  # noqa: E402

DATA = Path("/usr/share/datasets/fashion-mnist")
JOB = REPO / "jobs" / "fashion_mnist.yaml"
DOCS = REPO / "docs"
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
TEACHER_ARCH = {"embedding_size": 32, "hidden_sizes": [32, 64, 128], "depths": [1, 1, 1]}
VALIDATION_FRACTION = 0.1  # jobs/fashion_mnist.yaml's corpus.validation_fraction


@dataclass(frozen=True)
class Setting:
    """Where a run writes (``out``), the IDX files it reads, and the smoke mode's changes."""

    out: Path
    data: Path = DATA
    student_epochs: int | None = None  # None: the job's
    in_process: bool = False  # `kdscale run` in this process (reusing its Ray) instead of a subprocess


def idx_files(data: Path) -> dict[str, str]:
    """The job's corpus fields for the four IDX files in ``data`` (Fashion-MNIST's names)."""
    return {
        "paths": str(data / "train-images-idx3-ubyte.gz"),
        "labels": str(data / "train-labels-idx1-ubyte.gz"),
        "heldout_paths": str(data / "t10k-images-idx3-ubyte.gz"),
        "heldout_labels": str(data / "t10k-labels-idx1-ubyte.gz"),
    }


def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(gzip.compress(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()))


def synthetic_data(folder: Path, train: int = 300, test: int = 100) -> Path:
    """A stand-in for Fashion-MNIST in the same format (gzipped IDX, 28x28 grey, labels 0-9) for
    ``--smoke``: noise images with random labels, so no model reaches zero error."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", train), ("t10k", test)):
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", rng.integers(0, len(CLASSES), n, dtype=np.uint8))
    return folder


def load(split: str, data: Path = DATA) -> tuple[np.ndarray, np.ndarray]:
    prefix = "train" if split == "train" else "t10k"
    return read_idx(str(data / f"{prefix}-images-idx3-ubyte.gz")), read_idx(
        str(data / f"{prefix}-labels-idx1-ubyte.gz")
    )


def training_images(data: Path = DATA) -> tuple[np.ndarray, np.ndarray]:
    """The training images outside the job's validation split (the same content-hash split kdscale
    makes), so no model the settings are chosen with has seen the validation images."""
    from kdscale.data.corpus import split_of
    from kdscale.data.images import example_id

    x, y = load("train", data)
    keep = [
        split_of(example_id(x[i].reshape(-1), int(y[i])), 0.0, VALIDATION_FRACTION) == "train" for i in range(len(x))
    ]
    return x[keep], y[keep]


def train_teacher(folder: Path, epochs: int, seed: int = 0, data: Path = DATA) -> dict:
    """A ResNet classifier trained on the hard labels; returns its settings and test error."""
    from transformers import ResNetConfig, ResNetForImageClassification

    settings = {
        "arch": TEACHER_ARCH,
        "epochs": epochs,
        "seed": seed,
        "batch": 128,
        "lr": 3e-3,
        "validation_fraction": VALIDATION_FRACTION,
    }
    marker = folder / "kdscale_teacher.json"
    if marker.exists() and json.loads(marker.read_text())["settings"] == settings:
        return json.loads(marker.read_text())
    torch.manual_seed(seed)
    torch.set_num_threads(os.cpu_count() or 1)
    x, y = training_images(data)
    tx, ty = load("test", data)
    mean, std = float(x.mean() / 255), float(x.std() / 255)
    task = ImageClassification((1, 28, 28), (mean,), (std,), CLASSES)
    inputs = task.model_inputs({"pixels": x.reshape(len(x), -1)})["pixel_values"]
    test_inputs = task.model_inputs({"pixels": tx.reshape(len(tx), -1)})["pixel_values"]
    labels = torch.from_numpy(y.astype(np.int64))
    config = ResNetConfig(
        num_channels=1,
        id2label=dict(enumerate(CLASSES)),
        label2id={c: i for i, c in enumerate(CLASSES)},
        **TEACHER_ARCH,
    )
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
    record = {
        "settings": settings,
        "test_error": error,
        "seconds": time.perf_counter() - started,
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    marker.write_text(json.dumps(record))
    return record


# Student sizes: "small" is the job's own students; others retrain both students with another
# architecture from the same cache (reused, not recomputed). Distillation's benefit depends on
# the student's capacity (Cho & Hariharan 2019; Mirzadeh et al. 2020), so more than one is measured.
SIZES = {
    "small": None,
    "medium": {"embedding_size": 16, "hidden_sizes": [24, 48], "depths": [1, 1]},
}


# Loss settings tried on the medium students beside the job's own (alpha 0.5, T = 1, chosen on
# validation among these five on 2026-12-01): Hinton et al.'s alpha 0.9, T = 4 (the job's first
# setting, which lost to the scratch student) and three between. Every (alpha, T) here trains
# from the same cache (a full cache is re-tempered exactly to any T).
SWEEP = [(0.9, 4.0), (0.5, 2.0), (0.9, 2.0), (0.5, 4.0)]


def derived_job(
    setting: Setting,
    name: str,
    students: list[dict] | None = None,
    architecture: dict | None = None,
    first: bool = False,
) -> Path:
    """jobs/fashion_mnist.yaml reading the teacher trained into ``setting.out`` and the IDX files in
    ``setting.data``; unless ``first`` (the job itself), renamed and reading the first run's cache,
    with its students' architecture replaced or its students replaced (each merged over the job's
    first student)."""
    import yaml

    out = setting.out
    spec = yaml.safe_load(JOB.read_text())
    spec["teacher"]["path"] = str(out / "teacher")  # where train_teacher wrote it (--out's, not the job's)
    for key, path in idx_files(setting.data).items():
        spec["corpus"][key] = [path]
    if not first:
        spec["name"] = f"fashion-mnist-{name}"
        spec.setdefault("cache", {})["uri"] = str(out / "work" / "cache")  # reused, not recomputed
    if students is not None:
        base = spec["students"][0]
        spec["students"] = [{**base, **s, "loss": {**base["loss"], **s.get("loss", {})}} for s in students]
    for student in spec["students"]:
        student["architecture"] = architecture or student["architecture"]
        if setting.student_epochs is not None:
            student["train"] = {**student["train"], "epochs": setting.student_epochs}
    folder = out / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "job.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    return folder / "job.yaml"


def size_job(setting: Setting, size: str) -> tuple[Path, Path]:
    """The job file and workdir for one student size."""
    if SIZES[size] is None:
        return derived_job(setting, size, first=True), setting.out / "work"
    return derived_job(setting, size, architecture=SIZES[size]), setting.out / size / "work"


def run_size(setting: Setting, size: str) -> dict:
    return run_job(setting, *size_job(setting, size), size)


def run_sweep(setting: Setting) -> dict:
    students = [{"name": f"a{alpha}-t{t:g}", "loss": {"alpha": alpha, "temperature": t}} for alpha, t in SWEEP]
    job = derived_job(setting, "medium-sweep", students, SIZES["medium"])
    return run_job(setting, job, setting.out / "medium-sweep" / "work", "medium-sweep")


def run_job(setting: Setting, job: Path, workdir: Path, size: str) -> dict:
    """``kdscale run`` one job (its log beside its workdir) and collect its students' results."""
    started = time.perf_counter()
    workdir.parent.mkdir(parents=True, exist_ok=True)
    mlflow_uri = f"sqlite:///{setting.out / 'mlflow.db'}"
    kdscale_run(job, workdir, mlflow_uri, workdir.parent / f"log-{size}.txt", size, setting.in_process)
    summary = json.loads((workdir / "summary.json").read_text())
    from kdscale.config import load_job
    from kdscale.models.student import count_parameters
    from kdscale.pipeline import prepare

    spec = load_job(job)
    prepared = prepare(spec)
    losses = {s.name: s.loss for s in spec.students}
    students = {
        name: {
            "test_error": 1 - s["accuracy"],
            "test_ce": s["heldout_ce"],
            "alpha": losses[name].alpha,
            "validation_error": 1 - s["validation_accuracy"],
            "validation_ce": s["validation_ce"],
            "temperature": losses[name].temperature,
            "parameters": count_parameters(prepared.student_configs[name], prepared.task),
            "train_seconds": s["train_seconds"],
            "evals": s["evals"],
        }
        for name, s in summary["students"].items()
    }
    teacher_accuracy = next(iter(summary["students"].values()))["teacher_accuracy"]
    return {
        "students": students,
        "teacher_test_error": 1 - teacher_accuracy,
        "cache": {"bytes_per_image": summary["cache"]["bytes_per_token"], "cache_id": summary["cache"]["cache_id"]},
        "job_seconds": time.perf_counter() - started,
    }


def gap_closed(scratch: float, distilled: float, teacher: float) -> float:
    """The share of the scratch student's error gap to the teacher that distillation removes
    (negative: distillation made the student worse)."""
    return (scratch - distilled) / (scratch - teacher) if scratch > teacher else 0.0


def medium_kd_arms(sizes: dict, sweep: dict) -> list[tuple[str, dict]]:
    """(label, result) of every distilled medium student: the job's and the sweep's."""
    job = sizes["medium"]["students"]["distilled"]
    arms = [(f"alpha {job['alpha']}, T = {job['temperature']:g} (the job's)", job)]
    return arms + [(f"alpha {r['alpha']}, T = {r['temperature']:g}", r) for r in sweep["students"].values()]


def chosen_on_validation(sizes: dict, sweep: dict) -> tuple[str, dict]:
    """The distilled medium student with the lowest validation error (the test set never chooses)."""
    return min(medium_kd_arms(sizes, sweep), key=lambda arm: arm[1]["validation_error"])


def write_doc(teacher: dict, sizes: dict, sweep: dict | None = None, docs: Path = DOCS) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(sizes), figsize=(6 * len(sizes), 4), squeeze=False)
    for ax, (size, r) in zip(axes[0], sizes.items()):
        for name, colour in (("scratch", "C1"), ("distilled", "C0")):
            s = r["students"][name]
            ax.plot(
                [e["tokens"] for e in s["evals"]],
                [e["heldout_ce"] for e in s["evals"]],
                marker="o",
                markersize=3,
                color=colour,
                label=f"{name} (alpha {s['alpha']})",
            )
        ax.set(
            xlabel="training images seen",
            ylabel="test cross-entropy (nats)",
            title=f"{size} students ({r['students']['scratch']['parameters']:,} parameters)",
        )
        ax.legend(frameon=False)
    fig.tight_layout()
    docs.mkdir(exist_ok=True)
    fig.savefig(docs / "fashion_mnist.png", dpi=110)
    first = next(iter(sizes.values()))["students"]["distilled"]
    distilled_loss, distilled_t = first["alpha"], first["temperature"]
    lines = [
        "# Fashion-MNIST: distilling an image classifier",
        "",
        "Generated by `.venv/bin/python benchmarks/fashion_mnist.py` (see its docstring). The teacher's class "
        "distribution at T = 4 goes through the same Parquet cache (`full` kind) and the students through the same "
        "Ray Train + DeepSpeed path as the language models; the job is [jobs/fashion_mnist.yaml]"
        "(../jobs/fashion_mnist.yaml). Every student of a size has the same architecture, initialisation, data order "
        "and steps (4 epochs); *scratch* trains on the hard labels only (alpha 0), *distilled* on "
        f"{distilled_loss} x soft targets at T = {distilled_t:g} + {1 - distilled_loss:g} x hard labels. Test = the "
        "official 10,000 test images; validation = 10% of the 60,000 training images by content hash (held back "
        "from teacher and students); one seed.",
        "",
        "| model | parameters | test error | errors (of 10,000) | test CE | distillation closes |",
        "|---|---|---|---|---|---|",
        f"| teacher (ResNet {TEACHER_ARCH['hidden_sizes']}) | {teacher['parameters']:,} | "
        f"{100 * teacher['test_error']:.2f}% | {round(teacher['test_error'] * 10000)} | – | |",
    ]
    for size, r in sizes.items():
        sc, di = r["students"]["scratch"], r["students"]["distilled"]
        closed = gap_closed(sc["test_error"], di["test_error"], teacher["test_error"])
        for name, st, note in (
            (f"{size} student from scratch", sc, ""),
            (f"{size} student distilled", di, f"{100 * closed:+.0f}% of the gap to the teacher"),
        ):
            lines.append(
                f"| {name} | {st['parameters']:,} | {100 * st['test_error']:.2f}% | "
                f"{round(st['test_error'] * 10000)} | {st['test_ce']:.4f} | {note} |"
            )
    cache = next(iter(sizes.values()))["cache"]
    lines += ["", f"Cache: {cache['bytes_per_image']:.1f} bytes per image (raw pixels, label and 10 log-probs).", ""]
    if sweep is not None and "medium" in sizes:
        scratch = sizes["medium"]["students"]["scratch"]
        arms = [("scratch (hard labels)", scratch), *medium_kd_arms(sizes, sweep)]
        chosen = chosen_on_validation(sizes, sweep)
        lines += [
            "## Loss settings, medium students",
            "",
            f"The job's setting (alpha {distilled_loss}, T = {distilled_t:g}) is the one this sweep chose on "
            "2026-12-01; its first setting, Hinton et al.'s alpha 0.9, T = 4, is one of the arms. Every arm trains "
            "from the same cache (a `full` cache is re-tempered exactly to any T). The setting is **chosen on the "
            f"validation split** ({100 * VALIDATION_FRACTION:.0f}% of the training images by content hash, which "
            "neither the teacher nor any student trained on); the test set is only reported. One seed.",
            "",
            "| medium student | validation error | test error | vs scratch (test errors of 10,000) | test CE |",
            "|---|---|---|---|---|",
        ]
        for name, r in arms:
            delta = round((r["test_error"] - scratch["test_error"]) * 10000)
            mark = " **(chosen)**" if name == chosen[0] else ""
            lines.append(
                f"| {name}{mark} | {100 * r['validation_error']:.2f}% | {100 * r['test_error']:.2f}% | "
                f"{delta:+d} | {r['test_ce']:.4f} |"
            )
        lines += [
            "",
            f"Chosen on validation: {chosen[0]}, test error {100 * chosen[1]['test_error']:.2f}% against "
            f"scratch's {100 * scratch['test_error']:.2f}%.",
            "",
        ]
    lines += ["![test cross-entropy of the students during training](fashion_mnist.png)", ""]
    (docs / "fashion_mnist.md").write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "fashion-mnist")
    ap.add_argument("--teacher-epochs", type=int, default=6)
    ap.add_argument("--sizes", nargs="+", default=None, choices=list(SIZES), help="default: all (--smoke: small)")
    ap.add_argument("--no-sweep", action="store_true", help="skip the loss-settings sweep on the medium students")
    add_smoke(ap)
    args = ap.parse_args(argv)
    if args.smoke:
        with tempfile.TemporaryDirectory(prefix="fashion-mnist-smoke-") as tmp:
            out = Path(tmp)
            setting = Setting(out, synthetic_data(out / "data"), SMOKE_EPOCHS, in_process=True)
            benchmark(setting, 1, args.sizes or ["small"], args.no_sweep, out / "docs")
        return
    if not (DATA / "train-images-idx3-ubyte.gz").exists():
        raise SystemExit(f"no Fashion-MNIST under {DATA}: apt-get install dataset-fashion-mnist")
    benchmark(Setting(args.out.resolve()), args.teacher_epochs, args.sizes or list(SIZES), args.no_sweep, DOCS)


def benchmark(setting: Setting, teacher_epochs: int, wanted: list[str], no_sweep: bool, docs: Path) -> None:
    """Teacher, the students of every size wanted (and the sweep), the document; the JSON line."""
    teacher = train_teacher(setting.out / "teacher", teacher_epochs, data=setting.data)
    print(f"teacher: test error {teacher['test_error']:.4f}", file=sys.stderr)
    sizes = {size: run_size(setting, size) for size in ["small", *[s for s in wanted if s != "small"]]}
    # kdscale's teacher argmax from the cache must agree with the teacher's own evaluation
    kd_teacher_error = sizes["small"]["teacher_test_error"]
    teacher_row = {
        "test_error": kd_teacher_error,
        "test_error_own_eval": teacher["test_error"],
        "parameters": teacher["parameters"],
        "train_seconds": teacher["seconds"],
    }
    sweep = run_sweep(setting) if "medium" in sizes and not no_sweep else None
    write_doc(teacher_row, sizes, sweep, docs)
    result = {"teacher": teacher_row}
    if sweep is not None:
        result["medium_sweep"] = {
            name: {k: v for k, v in st.items() if k != "evals"} for name, st in sweep["students"].items()
        }
        label, chosen = chosen_on_validation(sizes, sweep)
        scratch = sizes["medium"]["students"]["scratch"]
        result["medium_chosen_on_validation"] = {
            "arm": label,
            "test_error": chosen["test_error"],
            "scratch_test_error": scratch["test_error"],
            "ratio": chosen["test_error"] / scratch["test_error"],
        }
    for size, r in sizes.items():
        sc, di = r["students"]["scratch"], r["students"]["distilled"]
        result[size] = {
            **{name: {k: v for k, v in st.items() if k != "evals"} for name, st in r["students"].items()},
            "ratio": di["test_error"] / sc["test_error"],
            "gap_closed": gap_closed(sc["test_error"], di["test_error"], kd_teacher_error),
            "job_seconds": r["job_seconds"],
        }
    print(json.dumps({"fashion_mnist": result, "goal": "distilled test error below the scratch student's"}))


if __name__ == "__main__":
    main()
