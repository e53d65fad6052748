"""Image classification through the same cache and training path (jobs/fashion_mnist.yaml's
shape, on tiny synthetic IDX files and a random ResNet teacher)."""

from __future__ import annotations

import copy
import gzip
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from kdscale.cache.reader import open_manifest, read_split
from kdscale.cache.verify import problems
from kdscale.cli import app
from kdscale.config import ConfigError, CorpusSpec, load_job
from kdscale.data.images import IdxError, load_images, read_idx
from kdscale.models.task import ImageClassification, table_arrays
from tests.conftest import sqlite_store, write_job

CLASSES = 4
SIDE = 12


def write_idx(path: Path, array: np.ndarray) -> Path:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


def synthetic(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Noisy images whose class is where a bright 6x6 block sits (one quadrant per class)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, CLASSES, n)
    images = rng.integers(0, 60, (n, SIDE, SIDE))
    for i, c in enumerate(labels):
        r, col = divmod(int(c), 2)
        images[i, r * 6 : r * 6 + 6, col * 6 : col * 6 + 6] += 180
    return images.astype(np.uint8), labels.astype(np.uint8)


def image_files(folder: Path, train: int = 320, test: int = 80) -> dict[str, list[str]]:
    folder.mkdir(parents=True, exist_ok=True)
    x, y = synthetic(train, 1)
    tx, ty = synthetic(test, 2)
    return {
        "corpus.paths": [str(write_idx(folder / "train-images-idx3-ubyte.gz", x))],
        "corpus.labels": [str(write_idx(folder / "train-labels-idx1-ubyte.gz", y))],
        "corpus.heldout_paths": [str(write_idx(folder / "t10k-images-idx3-ubyte", tx))],
        "corpus.heldout_labels": [str(write_idx(folder / "t10k-labels-idx1-ubyte", ty))],
    }


TEACHER = {
    "name": "random-resnet",
    "init": "random",
    "replicas": 2,
    "num_cpus": 0.5,
    "batch_size": 64,
    "architecture": {
        "model_type": "resnet",
        "num_channels": 1,
        "embedding_size": 8,
        "hidden_sizes": [8, 16],
        "depths": [1, 1],
        "id2label": {i: f"quadrant-{i}" for i in range(CLASSES)},
    },
}


def image_job(tmp_path: Path, **overrides) -> Path:
    """jobs/fashion_mnist.yaml made tiny: synthetic files, a random teacher, short training."""
    settings = {
        **image_files(tmp_path / "images"),
        "teacher": copy.deepcopy(TEACHER),
        "cache.rows_per_shard": 64,
        "corpus.validation_fraction": 0.0,  # all 320 synthetic images train (the real job's split: tested below)
        "students.0.train.epochs": 3,
        "students.1.train.epochs": 3,
        "students.0.train.micro_batch_size": 16,
        "students.1.train.micro_batch_size": 16,
        "students.0.train.eval_every_steps": 5,
        "students.1.train.eval_every_steps": 5,
        "students.0.train.lr": 5.0e-3,
        "students.1.train.lr": 5.0e-3,
        "students.0.architecture": {"embedding_size": 8, "hidden_sizes": [8], "depths": [1]},
        "students.1.architecture": {"embedding_size": 8, "hidden_sizes": [8], "depths": [1]},
        "eval.batch_size": 32,
        # mostly the teacher's soft targets, at its cache's T (the job's own alpha 0.5, T = 1 was
        # chosen on real data): a random teacher must visibly pull this student towards its argmax
        "students.1.loss.alpha": 0.9,
        "students.1.loss.temperature": 4.0,
        **overrides,
    }
    return write_job(tmp_path, base="fashion_mnist.yaml", **settings)


# Units --------------------------------------------------------------------------------------


def test_idx_round_trip_and_refusals(tmp_path):
    x, y = synthetic(10, 0)
    np.testing.assert_array_equal(read_idx(str(write_idx(tmp_path / "x.gz", x))), x)
    np.testing.assert_array_equal(read_idx(str(write_idx(tmp_path / "y", y))), y)
    (tmp_path / "bad").write_bytes(b"\x01\x02\x08\x01" + b"\0" * 8)
    with pytest.raises(IdxError, match="bad magic"):
        read_idx(str(tmp_path / "bad"))
    (tmp_path / "short").write_bytes(write_idx(tmp_path / "s", x).read_bytes()[:-5])
    with pytest.raises(IdxError, match="values after the header"):
        read_idx(str(tmp_path / "short"))
    write_idx(tmp_path / "few-labels", y[:7])
    spec = CorpusSpec(paths=[str(tmp_path / "x.gz")], format="idx", labels=[str(tmp_path / "few-labels")])
    with pytest.raises(IdxError, match="10 images but .* 7 labels"):
        load_images(spec)


def test_content_split_and_cap(tmp_path):
    files = image_files(tmp_path, train=200, test=10)
    spec = CorpusSpec(paths=files["corpus.paths"], labels=files["corpus.labels"], format="idx", heldout_fraction=0.25)
    corpus = load_images(spec)
    assert len(corpus.train) + len(corpus.heldout) == 200 and 25 < len(corpus.heldout) < 75
    again = load_images(spec)
    assert again.content_hash() == corpus.content_hash()
    capped = load_images(spec.model_copy(update={"max_tokens": 50}))
    assert len(capped.train) == 50 and capped.content_hash() != corpus.content_hash()
    assert (corpus.height, corpus.width) == (SIDE, SIDE)


def test_image_task_normalises_as_declared():
    task = ImageClassification((1, 2, 2), (0.5,), (0.25,), ("a", "b"))
    pixels = np.array([[0, 255, 51, 204]], dtype=np.uint8)
    x = task.model_inputs({"pixels": pixels})["pixel_values"]
    assert x.shape == (1, 1, 2, 2)
    torch.testing.assert_close(x.reshape(-1), torch.tensor([-2.0, 2.0, -1.2, 1.2]))
    other = ImageClassification((1, 2, 2), (0.5,), (0.3,), ("a", "b"))
    assert task.fingerprint() != other.fingerprint() and len(task) == 2


def test_image_job_problems_are_listed_by_field(tmp_path):
    job = image_job(
        tmp_path,
        **{
            "corpus.labels": [],
            "students.1.targets": "online",
            "teacher.shards": 2,
            "students.0.init": "teacher_layers",
            "students.0.architecture": {},
        },
    )
    with pytest.raises(ConfigError) as err:
        load_job(job)
    fields = {f for f, _ in err.value.problems}
    assert {"corpus.labels", "students.1.targets", "teacher.shards", "students.0.init"} <= fields
    text = write_job(tmp_path, **{"corpus.format": "idx"})
    with pytest.raises(ConfigError, match="corpus.format"):
        load_job(text)


@pytest.mark.ray
def test_mismatched_label_file_is_refused_before_anything_is_written(ray_session, tmp_path, mlflow_uri):
    job = image_job(tmp_path)
    x, y = synthetic(30, 3)
    write_idx(tmp_path / "images" / "train-images-idx3-ubyte.gz", x)
    write_idx(tmp_path / "images" / "train-labels-idx1-ubyte.gz", y[:29])
    result = CliRunner().invoke(app, ["precompute", str(job), "--workdir", str(tmp_path / "w")])
    assert result.exit_code == 2, result.output
    assert "30 images but" in result.output and "29 labels" in result.output
    assert not (tmp_path / "w").exists()


def test_dry_run_refuses_a_batch_larger_than_the_image_training_set(ray_session, tmp_path):
    """An image plan knows its training rows from the IDX headers: the dry run refuses the batch
    the run would refuse, before any teacher work (it passed before)."""
    job = image_job(tmp_path, **{"students.1.train.micro_batch_size": 1_000})
    result = CliRunner().invoke(app, ["run", str(job), "--workdir", str(tmp_path / "w"), "--dry-run"])
    assert result.exit_code == 2, result.output
    assert "students.1.train" in result.output and "320 training rows are too few" in result.output
    assert not (tmp_path / "w").exists()


# End to end ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def image_run(ray_session, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("images")
    job = image_job(tmp)
    runner = CliRunner(env={"MLFLOW_TRACKING_URI": sqlite_store(tmp)})
    result = runner.invoke(app, ["run", str(job), "--workdir", str(tmp / "work")])
    summary = json.loads((tmp / "work" / "summary.json").read_text()) if result.exit_code == 0 else None
    return {"result": result, "summary": summary, "work": tmp / "work", "job": job, "runner": runner}


@pytest.mark.ray
def test_images_go_through_the_cache_and_train_two_students(image_run):
    assert image_run["result"].exit_code == 0, image_run["result"].output
    cache = str(image_run["work"] / "cache")
    m = open_manifest(cache)
    assert problems(cache)[1] == []
    assert m.dataset.task["name"] == "image_classification" and m.dataset.task["input_shape"] == [1, SIDE, SIDE]
    assert m.dataset.task["labels"] == [f"quadrant-{i}" for i in range(CLASSES)]
    assert m.dataset.rows == {"train": 320, "heldout": 80} and m.totals["tokens"] == 400  # one position per image
    assert m.tokenizer.vocab_size == CLASSES and m.targets.kind == "full" and m.targets.temperature == 4.0
    assert m.totals["mean_ids_per_position"] == CLASSES  # full: the whole distribution at every position
    assert m.columns["train"][:4] == ["seq_id", "pixels", "labels", "teacher_nll"]
    heldout = read_split(cache, m, "heldout")
    arrays = table_arrays(heldout, ("pixels", "labels", "target_logprobs", "teacher_top1"))
    x, y = synthetic(80, 2)
    np.testing.assert_array_equal(arrays["pixels"], x.reshape(80, -1))
    np.testing.assert_array_equal(arrays["labels"][:, 0], y)
    probs = np.exp(arrays["target_logprobs"])
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(probs.argmax(-1), arrays["teacher_top1"][:, 0])  # argmax is T-independent

    students = image_run["summary"]["students"]
    for name in ("scratch", "distilled"):
        s = students[name]
        assert s["heldout_ce"] < s["heldout_ce_untrained"]
        assert s["tokens"] == 80 and 0 <= s["accuracy"] <= 1 and s["evals"]
        assert s["registered_model"] == {"name": f"fashion-mnist-{name}", "version": "1"}
    assert students["scratch"]["teacher_accuracy"] == students["distilled"]["teacher_accuracy"]
    # the labels are learnable from a quadrant's brightness: the hard-label student learns them
    assert students["scratch"]["accuracy"] > 0.6
    # the distilled student (alpha 0.9) follows the random teacher more than the label-only one
    assert students["distilled"]["top1_agreement"] > students["scratch"]["top1_agreement"]


@pytest.mark.ray
def test_image_export_loads_with_transformers(image_run):
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    assert image_run["result"].exit_code == 0, image_run["result"].output
    export = image_run["summary"]["students"]["distilled"]["export"]
    model = AutoModelForImageClassification.from_pretrained(export)
    assert model.config.id2label[2] == "quadrant-2"
    processor = AutoImageProcessor.from_pretrained(export)
    x, _ = synthetic(3, 5)
    inputs = processor(images=[img[:, :, None] for img in x], return_tensors="pt", input_data_format="channels_last")
    ours = ImageClassification((1, SIDE, SIDE)).model_inputs({"pixels": x.reshape(3, -1)})["pixel_values"]
    torch.testing.assert_close(inputs["pixel_values"], ours)  # the export says how to feed it
    assert model(**inputs).logits.shape == (3, CLASSES)


@pytest.mark.ray
def test_image_cache_inspect_and_eval(image_run):
    assert image_run["result"].exit_code == 0, image_run["result"].output
    runner = image_run["runner"]
    out = runner.invoke(app, ["cache", "inspect", str(image_run["work"] / "cache"), "--json"])
    assert out.exit_code == 0, out.output
    info = json.loads(out.output)
    assert info["task"]["name"] == "image_classification" and info["kind"] == "full"
    again = runner.invoke(app, ["eval", str(image_run["job"]), "--workdir", str(image_run["work"])])
    assert again.exit_code == 0, again.output
    summary = json.loads((image_run["work"] / "summary.json").read_text())
    assert summary["students"]["distilled"]["accuracy"] == pytest.approx(
        image_run["summary"]["students"]["distilled"]["accuracy"]
    )


# The real data (Debian's dataset-fashion-mnist, installed by `infra/setup.sh test`) ---------

FASHION = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.slow
def test_fashion_mnist_files_read_as_the_job_names_them():
    spec = load_job(Path(__file__).parent.parent / "jobs" / "fashion_mnist.yaml", check_resources=False)
    corpus = load_images(spec.corpus)
    assert (len(corpus.train) + len(corpus.validation), len(corpus.heldout), corpus.height, corpus.width) == (
        60000,
        10000,
        28,
        28,
    )
    assert 0.09 < len(corpus.validation) / 60000 < 0.11  # validation_fraction 0.1 of the training images
    counts = np.bincount([label for _, label in corpus.train + corpus.validation], minlength=10)
    assert counts.tolist() == [6000] * 10  # Fashion-MNIST is balanced
    assert spec.corpus.paths[0].startswith(str(FASHION))


@pytest.mark.ray
@pytest.mark.slow
def test_fashion_mnist_precompute_with_a_stand_in_teacher(ray_session, tmp_path, mlflow_uri):
    """The real job file on the real images (a slice), with a random 10-class teacher standing in
    for the trained one that benchmarks/fashion_mnist.py makes."""
    teacher = copy.deepcopy(TEACHER)
    teacher["architecture"]["id2label"] = {i: str(i) for i in range(10)}
    job = write_job(tmp_path, base="fashion_mnist.yaml", teacher=teacher, **{"corpus.max_tokens": 2000})
    result = CliRunner().invoke(app, ["precompute", str(job), "--workdir", str(tmp_path / "w")])
    assert result.exit_code == 0, result.output
    m = open_manifest(str(tmp_path / "w" / "cache"))
    validation = m.dataset.rows["validation"]
    assert m.dataset.rows == {"train": 2000, "heldout": 10000, "validation": validation} and validation > 5000
    assert m.dataset.task["input_shape"] == [1, 28, 28]
    assert m.dataset.sources[0].endswith("train-images-idx3-ubyte.gz")
    assert problems(str(tmp_path / "w" / "cache"))[1] == []
