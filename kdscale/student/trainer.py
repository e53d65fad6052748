"""Driver side of student training: check the plan, stream the cache through Ray Data into a
Ray Train ``TorchTrainer`` whose workers each run DeepSpeed, draw progress, and collect results.
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import ray
from rich.progress import Progress

from kdscale import fs
from kdscale.cache.format import Manifest, TargetsInfo
from kdscale.cache.kinds import kind as target_kind
from kdscale.cache.reader import shard_uris
from kdscale.config import JobSpec, StudentSpec
from kdscale.fingerprint import digest
from kdscale.progress import say
from kdscale.ray_runtime import progress_counter
from kdscale.student.loop import HF_DIR, STATE_FILE, steps_per_epoch, train_loop_per_worker
from kdscale.student.targets_source import FromCache, FromTeacher
from kdscale.student.worker_config import WorkerConfig

# Ray Train's record of a run's checkpoints, in the run's storage folder
SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"


@dataclass
class TrainResult:
    checkpoint_dir: str  # local folder holding the final checkpoint (hf/ + state)
    history: list[dict[str, Any]] = field(default_factory=list)
    epochs: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    steps: int = 0
    resumed_at_epochs: list[int] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)  # held-out CE during training
    nodes: list[str] = field(default_factory=list)  # IP/node-id of each training worker (by rank), last run
    started_at: float = 0.0  # wall clock (epoch seconds) when this call started the training, and
    ended_at: float = 0.0  # when it ended: students trained at once overlap
    reused: bool = False  # a finished training's checkpoint, reused without starting workers


def cache_problems(spec: JobSpec, index: int, targets: TargetsInfo, train_rows: int | None) -> list[tuple[str, str]]:
    """Problems between a student's settings and the cache it would train from (its targets and
    training rows: a committed manifest's, or a precompute plan's before any teacher work;
    ``train_rows`` None: not known yet, the targets alone are checked)."""
    s = spec.students[index]
    where = f"students.{index}"
    problems = []
    # a full cache is re-tempered exactly to any loss temperature; sampled/top-k ids were chosen at one
    if not target_kind(targets.kind).can_retemper and abs(s.loss.temperature - targets.temperature) > 1e-9:
        problems.append(
            (
                f"{where}.loss.temperature",
                f"{s.loss.temperature} differs from the cache's capture temperature "
                f"{targets.temperature}; the stored targets are softmax(z/{targets.temperature}) "
                f"({targets.kind} targets cannot be re-tempered; a full cache can)",
            )
        )
    if train_rows is not None and steps_per_epoch(train_rows, s.train) < 1:
        problems.append(
            (
                f"{where}.train",
                f"{train_rows} training rows are too few for {s.train.num_workers} workers x "
                f"micro_batch_size {s.train.micro_batch_size} x grad_accum {s.train.grad_accum}",
            )
        )
    return problems


def training_run_name(
    student: StudentSpec, data_key: str, seed: int, init_path: str | None, student_config: dict[str, Any]
) -> str:
    """Checkpoints live under a name keyed by everything that shapes the training, so rerunning
    the same student resumes (or reuses) its checkpoints, while a changed spec or cache starts
    afresh instead of silently continuing another run. ``seed`` is the effective one (the job's
    when the student sets none: a seed-1 job once reused a seed-0 job's checkpoint)."""
    return "ray-" + digest(
        {
            "student": student.model_dump(mode="json"),
            "data": data_key,
            "seed": seed,
            "init": init_path,
            "config": student_config,
        },
        16,
    )


def _arrow_filesystem(uri: str):
    """A pyarrow filesystem for fsspec URIs Ray cannot open natively (None: let Ray decide)."""
    if not fs.is_remote(uri):
        return None
    import pyarrow.fs as pafs

    fsys, _ = fs.filesystem(uri)
    return pafs.PyFileSystem(pafs.FSSpecHandler(fsys))


def _strip(uri: str) -> str:
    return fs.filesystem(uri)[1] if fs.is_remote(uri) else uri


@dataclass
class TrainingData:
    """What a student trains on: the rows (a Ray dataset), and how workers get their targets."""

    dataset: Any
    train_rows: int
    seq_len: int
    targets: FromCache | FromTeacher  # how workers get their targets
    key: str  # identifies the data for checkpoint keying (cache_id, or the corpus hash online)


def cache_data(cache_uri: str, manifest: Manifest) -> TrainingData:
    """Stream the cache's train split (its target columns decoded in the workers)."""
    uris = shard_uris(cache_uri, manifest, "train")
    columns = [c for c in manifest.columns["train"] if c not in ("seq_id", "teacher_nll")]
    dataset = ray.data.read_parquet(
        [_strip(u) for u in uris], filesystem=_arrow_filesystem(cache_uri), columns=columns, shuffle=None
    )
    return TrainingData(
        dataset,
        manifest.dataset.rows["train"],
        manifest.dataset.seq_len,
        FromCache(manifest, cache_uri),
        manifest.cache_id,
    )


def online_data(spec: JobSpec, rows: list, vocab_size: int, content_hash: str) -> TrainingData:
    """The packed corpus rows only; every worker runs the teacher itself (online KD)."""
    import numpy as np
    import pyarrow as pa

    table = pa.table({"input_ids": pa.array([np.asarray(r, dtype=np.int32) for r in rows], type=pa.list_(pa.int32()))})
    targets = FromTeacher(spec.teacher, vocab_size, spec.seed)
    return TrainingData(ray.data.from_arrow(table), len(rows), len(rows[0]), targets, "online-" + content_hash)


def train_student(
    spec: JobSpec,
    student: StudentSpec,
    student_config,
    data: TrainingData,
    student_dir: str,
    tracking_uri: str,
    run_id: str | None,
    init_path: str | None = None,
    heldout: dict | None = None,
    task: dict | None = None,
    *,
    final_dir: str,
    progress: Progress,
) -> TrainResult:
    """Train one student on Ray Train for ``task`` (its description; default causal LM);
    ``heldout`` (the held-out rows' input columns) is scored during training when
    ``train.eval_every_steps`` asks for it. The final model and training state are copied into
    ``final_dir``, an existing local folder the caller removes once it is done with them.
    ``progress``: the live display to draw this student's bar in (students trained at once share
    one)."""
    t = student.train
    cfg = WorkerConfig(
        student=student.name,
        train=t,
        loss=student.loss,
        targets=data.targets,
        student_config=student_config.to_dict(),
        seq_len=data.seq_len,
        seed=spec.student_seed(student),
        init_path=init_path,
        steps_per_epoch=steps_per_epoch(data.train_rows, t),
        threads=t.threads_per_worker or max(1, int(t.cpus_per_worker)),
        task=task or {"name": "causal_lm"},
        tracking_uri=tracking_uri,
        run_id=run_id,
        counter=progress_counter(),
        counter_key=f"tokens/{student.name}/{uuid.uuid4().hex}",
        heldout=heldout if t.eval_every_steps else None,
    )
    storage = fs.join(student_dir, "checkpoints")
    run_name = training_run_name(student, data.key, cfg.seed, init_path, cfg.student_config)
    started, started_at = time.perf_counter(), time.time()
    checkpoint, done = finished_checkpoint(storage, run_name, t.epochs), 0.0
    reused = checkpoint is not None
    if checkpoint is None:
        result, done = fit_with_progress(ray_trainer(cfg, data, storage, run_name), cfg, progress)
        checkpoint = result.checkpoint
    ended_at = time.time()
    if checkpoint is None:
        raise RuntimeError(f"training {student.name} finished without a checkpoint")
    local = download_final(checkpoint, final_dir)
    with open(os.path.join(local, STATE_FILE)) as f:
        state = json.load(f)
    say_if_not_fresh(student.name, state, done, t.epochs, fs.join(storage, run_name))
    return TrainResult(
        checkpoint_dir=local,
        history=state["history"],
        epochs=state.get("epochs", []),
        seconds=time.perf_counter() - started,
        steps=state["step"],
        resumed_at_epochs=state.get("resumed_at_epochs", []),
        evals=state.get("evals", []),
        nodes=state.get("nodes", []),
        started_at=started_at,
        ended_at=ended_at,
        reused=reused,
    )


def finished_checkpoint(storage: str, run_name: str, epochs: int):
    """The run's latest checkpoint when it already holds every epoch, else None. A rerun of a
    finished student (say, after adding another student to the job) then reuses it without
    starting a worker group only to find nothing left to do: on this machine that was 16 s per
    student; on a GPU cluster it is a placement, NCCL's set-up, the model's build and a load of its
    whole DeepSpeed state. The latest checkpoint is the one Ray Train's own record names
    (``checkpoint_manager_snapshot.json``, written once the checkpoint is stored); anything
    missing or unexpected in it, and the run goes through Ray Train, which resumes it as before."""
    from ray.train import Checkpoint

    run = fs.join(storage, run_name)
    try:
        name = fs.read_json(fs.join(run, SNAPSHOT_FILE))["latest_checkpoint_result"]["checkpoint_dir_name"]
        folder = fs.join(run, name)
        state = fs.read_json(fs.join(folder, STATE_FILE))
        finished = state["epoch"] >= epochs and fs.exists(fs.join(folder, HF_DIR))
    except (OSError, KeyError, TypeError, ValueError):  # no snapshot yet, or not the layout we know
        return None
    if not finished:
        return None
    return Checkpoint(_strip(folder) if fs.is_remote(folder) else folder, filesystem=_arrow_filesystem(folder))


def ray_trainer(cfg: WorkerConfig, data: TrainingData, storage: str, run_name: str):
    """A ``TorchTrainer`` for the worker loop: ``num_workers`` workers (a GPU each with
    ``use_gpu``, NCCL between them; gloo on CPUs), the data streamed to them, checkpoints under
    ``storage``/``run_name`` (the latest kept: a rerun resumes from it), ``max_failures``
    worker-group restarts."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    t = cfg.train
    resources = {"CPU": t.cpus_per_worker, **({"GPU": 1} if t.use_gpu else {})}
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"worker": cfg},
        scaling_config=ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu, resources_per_worker=resources),
        torch_config=TorchConfig(backend="nccl" if t.use_gpu else "gloo"),
        datasets={"train": data.dataset},
        run_config=RunConfig(
            name=run_name,
            storage_path=_strip(storage) if fs.is_remote(storage) else storage,
            storage_filesystem=_arrow_filesystem(storage),
            checkpoint_config=CheckpointConfig(num_to_keep=1),
            failure_config=FailureConfig(max_failures=t.max_failures),
        ),
    )


def fit_with_progress(trainer, cfg: WorkerConfig, progress: Progress):
    """``trainer.fit()`` in a thread while this one draws the tokens the workers report as a bar
    in ``progress``; the result and the tokens trained in this call (0: every epoch was already
    done), or the fit's error raised here."""
    t = cfg.train
    total = cfg.micro_batches_per_epoch * t.epochs * cfg.tokens_per_micro_batch * t.num_workers
    outcome: dict[str, Any] = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as e:  # surfaced in the caller's thread below
            outcome["error"] = e

    started = time.perf_counter()
    thread = threading.Thread(target=fit, daemon=True)
    thread.start()
    done = 0.0
    bar_task = progress.add_task(f"train {cfg.student} x{t.num_workers}", total=total, rate=0.0)
    while thread.is_alive():
        thread.join(timeout=0.5)
        done = ray.get(cfg.counter.get.remote()).get(cfg.counter_key, 0.0)
        rate = done / max(time.perf_counter() - started, 1e-9)
        progress.update(bar_task, completed=min(done, total), rate=rate)
    cfg.counter.pop.remote(cfg.counter_key)
    if "error" in outcome:
        raise outcome["error"]
    if outcome["result"].error:
        raise outcome["result"].error
    return outcome["result"], done


def say_if_not_fresh(name: str, state: dict[str, Any], done: float, epochs: int, where: str) -> None:
    """Tell the user when a student was not trained from scratch by this call."""
    if done == 0 and state["epoch"] >= epochs:
        say(
            f"Student {name}: already trained ({state['epoch']} epochs) in {where}; "
            "reusing that checkpoint without starting its workers (delete it to train again)"
        )
    elif state.get("resumed_at_epochs"):
        say(f"Student {name}: resumed from its checkpoint at epoch(s) {state['resumed_at_epochs']} ({where})")


def download_final(checkpoint, into: str) -> str:
    """The final checkpoint's model (``hf/``) and training state, copied into ``into``: what
    evaluation and export read. Not its DeepSpeed state (AdamW's two moments: twice the model
    again), which only a resumed run reads, from Ray Train's storage. Ray's own
    ``Checkpoint.to_directory()`` copies all of it into a new /tmp folder that nothing removes:
    233 of them, one per trained student, had piled up in /tmp on this machine."""
    import pyarrow.fs as pafs

    source, root, local = checkpoint.filesystem, checkpoint.path, pafs.LocalFileSystem()
    os.makedirs(os.path.join(into, HF_DIR), exist_ok=True)
    model = source.get_file_info(pafs.FileSelector(f"{root}/{HF_DIR}", recursive=True))
    for info in sorted(model, key=lambda i: i.path):  # a folder before its files (copy_files makes no folders)
        target = os.path.join(into, os.path.relpath(info.path, root))
        if info.type == pafs.FileType.Directory:
            os.makedirs(target, exist_ok=True)
        else:
            pafs.copy_files(info.path, target, source_filesystem=source, destination_filesystem=local)
    state = os.path.join(into, STATE_FILE)
    pafs.copy_files(f"{root}/{STATE_FILE}", state, source_filesystem=source, destination_filesystem=local)
    return into


def hf_folder(result: TrainResult) -> str:
    return os.path.join(result.checkpoint_dir, HF_DIR)
