"""The per-worker training loop run by Ray Train: stream cache rows, KD + CE loss, DeepSpeed step.

Every worker builds the same seeded student, streams its equal share of the cache's train split
(Ray Data ``streaming_split``), and checkpoints at epoch ends (every ``checkpoint_every_epochs``
and after the last): DeepSpeed's (ZeRO-partitioned) state from every rank plus, from rank 0, the
full model in Hugging Face format and the loss history. A restarted worker group resumes from the
latest checkpoint. A background thread reads and decodes ``prefetch_batches`` micro-batches ahead,
across epoch boundaries, so each epoch's stream start-up overlaps the previous epoch's last steps.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import queue
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

from kdscale.config import LossSpec, TrainSpec
from kdscale.models.task import Task, table_arrays, task_from_dict
from kdscale.student.losses import Divergence, distillation_loss, nll_sum

STATE_FILE = "kdscale_state.json"
CHECKPOINT_PREFIX = "kdscale-ckpt-"
HF_DIR = "hf"
DS_DIR = "deepspeed"


class NonFiniteLoss(RuntimeError):
    """A student whose loss went inf or nan: its weights are garbage from here on, so the run
    fails instead of finishing, exporting and registering them (``lr: .inf`` once did)."""


def steps_per_epoch(train_rows: int, train: TrainSpec) -> int:
    """Optimizer steps per epoch: rows are split equally over workers, partial batches dropped."""
    per_worker = train_rows // train.num_workers
    return (per_worker // train.micro_batch_size) // train.grad_accum


def _mean_across_ranks(values: list[float]) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(t)
        t /= torch.distributed.get_world_size()
    return t.tolist()


def _sum_across_ranks(values: list[float]) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(t)
    return t.tolist()


@torch.no_grad()
def heldout_ce(engine, task: Task, heldout: dict, rank: int, world: int, batch_size: int, device=None) -> float:
    """Held-out CE of the model being trained (``heldout``: the held-out rows' input columns).
    Each rank scores rows rank::world and the sums are all-reduced; every rank runs the same
    number of forwards (a rank short of rows scores a throw-away batch) because a ZeRO-3 forward
    gathers parameters collectively."""
    import math

    rows = len(next(iter(heldout.values())))
    mine = {k: v[rank::world] for k, v in heldout.items()}
    rounds = math.ceil(math.ceil(rows / world) / batch_size)
    engine.eval()
    nll = count = 0.0
    for i in range(rounds):
        batch = {k: v[i * batch_size : (i + 1) * batch_size] for k, v in mine.items()}
        empty = len(next(iter(batch.values()))) == 0
        logits = task.logits(
            engine, task.model_inputs({k: v[:1] for k, v in heldout.items()} if empty else batch, device)
        )
        if not empty:
            n, c = nll_sum(logits, task.labels(batch, device))
            nll, count = nll + n, count + c
    engine.train()
    total_nll, total_count = _sum_across_ranks([nll, count])
    return total_nll / max(total_count, 1.0)


class _DataClock:
    """Iterates ``items`` and measures how long the loop waited for them (reading, decoding:
    time not spent computing), and the first item's share — the data pipeline's start-up."""

    def __init__(self, items):
        self.items = iter(items)
        self.waited = 0.0
        self.first = 0.0

    def __iter__(self):
        for n in itertools.count():
            started = time.perf_counter()
            item = next(self.items, None)
            self.waited += time.perf_counter() - started
            if n == 0:
                self.first = self.waited
            if item is None:
                return
            yield item


class _Prefetcher:
    """Items of consecutive epochs, produced ``depth`` ahead by a background thread.

    ``make_epoch(e)`` yields epoch e's items; the thread runs epochs in order into a bounded
    queue, so epoch e+1's first reads happen while epoch e's last items are being trained on.
    ``depth`` 0 produces in the caller's thread. An error in the thread is raised in the caller's."""

    _END = object()

    def __init__(self, make_epoch: Callable[[int], Iterable], epochs: range, depth: int):
        self.make_epoch, self.depth = make_epoch, depth
        self.queue: queue.Queue = queue.Queue(maxsize=max(depth, 1))
        if depth:
            threading.Thread(target=self._produce, args=(epochs,), daemon=True, name="kdscale-prefetch").start()

    def _produce(self, epochs: range) -> None:
        try:
            for epoch in epochs:
                for item in self.make_epoch(epoch):
                    self.queue.put(item)
                self.queue.put(self._END)
        except BaseException as e:  # handed to the training thread, which raises it
            self.queue.put(e)

    def epoch(self, epoch: int) -> Iterator:
        if not self.depth:
            yield from self.make_epoch(epoch)
            return
        while (item := self.queue.get()) is not self._END:
            if isinstance(item, BaseException):
                raise item
            yield item


def _save_checkpoint(engine, cfg: dict[str, Any], state: dict[str, Any], rank: int, student_config, task: Task) -> str:
    """A checkpoint folder (Ray Train deletes it once uploaded); the state records how long the
    save took, so its cost shows beside the epochs' (``checkpoint_seconds``)."""
    from kdscale.student.engine import full_state_dict

    started = time.perf_counter()
    # Ray Train moves the folder into the run's storage and deletes it (delete_local_checkpoint_after_upload);
    # the student's name in it lets a test check that none is left behind.
    folder = tempfile.mkdtemp(prefix=f"{CHECKPOINT_PREFIX}{cfg.get('student', 'student')}-")
    engine.save_checkpoint(os.path.join(folder, DS_DIR), tag="ckpt")
    weights = full_state_dict(engine, cfg["train"]["zero_stage"])  # collective under ZeRO-3
    if rank == 0:
        model = task.auto_model().from_config(student_config)
        model.load_state_dict(weights)
        model.save_pretrained(os.path.join(folder, HF_DIR), safe_serialization=True)
        state["epochs"][-1]["checkpoint_seconds"] = time.perf_counter() - started
        with open(os.path.join(folder, STATE_FILE), "w") as f:
            json.dump(state, f)
    return folder


def train_loop_per_worker(cfg: dict[str, Any]) -> None:
    import ray.train
    from transformers import AutoConfig

    from kdscale.models.student import build_student
    from kdscale.student.engine import make_engine, select_device
    from kdscale.tracking.lineage import log_step_metrics

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    from kdscale.student.targets_source import make_source

    train, loss_spec = TrainSpec(**cfg["train"]), LossSpec(**cfg["loss"])
    device = select_device(train.use_gpu)
    torch.set_num_threads(max(1, int(cfg.get("threads", 1))))
    targets_for = make_source(cfg, device)
    task = task_from_dict(cfg.get("task") or {"name": "causal_lm"})

    config_dict = dict(cfg["student_config"])
    student_config = AutoConfig.for_model(config_dict.pop("model_type"), **config_dict)
    model = build_student(student_config, cfg["seed"], cfg.get("init_path"), task)
    total_steps = cfg["steps_per_epoch"] * train.epochs
    engine, precision = make_engine(model, train, total_steps, device, world)

    state: dict[str, Any] = {"epoch": 0, "step": 0, "history": []}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            engine.load_checkpoint(os.path.join(d, DS_DIR), tag="ckpt")
            with open(os.path.join(d, STATE_FILE)) as f:
                state = json.load(f)
        state.setdefault("resumed_at_epochs", []).append(state["epoch"])

    divergence = Divergence(loss_spec.divergence, beta=loss_spec.jsd_beta, skew=loss_spec.skew)
    shard = ray.train.get_dataset_shard("train")
    counter = cfg.get("counter")
    log_every = cfg.get("log_every", 1)
    tokens_per_micro = train.micro_batch_size * cfg["seq_len"]
    micro_per_epoch = cfg["steps_per_epoch"] * train.grad_accum
    tokens_per_step = tokens_per_micro * train.grad_accum * world
    heldout = cfg.get("heldout") if train.eval_every_steps else None

    def batches(epoch: int, decode: bool = True):
        """(model inputs, labels, targets) for this rank's share of one epoch, equal in count on
        every rank (or the collectives would hang); with ``decode=False`` the stored batch
        instead of targets."""
        stream = shard.iter_batches(
            batch_size=train.micro_batch_size,
            batch_format="pyarrow",
            drop_last=True,
            local_shuffle_buffer_size=4 * train.micro_batch_size,
            local_shuffle_seed=cfg["seed"] * 1000 + epoch,
        )
        for n, batch in enumerate(stream):
            if n >= micro_per_epoch:
                break
            arrays = table_arrays(batch, task.input_columns)
            inputs, labels = task.model_inputs(arrays, device), task.labels(arrays, device)
            yield inputs, labels, (targets_for(batch, inputs, epoch) if decode else batch)

    preloaded: list = []

    def epoch_batches(epoch: int):
        """One epoch's batches: streamed, or (``preload``) from the worker's share read once and
        kept, in a seeded order per epoch (decoded again per epoch when each epoch has its own draw)."""
        if not train.preload:
            yield from batches(epoch)
            return
        per_epoch = targets_for.varies_by_epoch
        if not preloaded:
            preloaded.extend(batches(epoch, decode=not per_epoch))
        order = torch.randperm(len(preloaded), generator=torch.Generator().manual_seed(cfg["seed"] * 1000 + epoch))
        for i in order.tolist():
            inputs, labels, stored = preloaded[i]
            yield inputs, labels, targets_for(stored, inputs, epoch) if per_epoch else stored

    prefetcher = _Prefetcher(epoch_batches, range(state["epoch"], train.epochs), train.prefetch_batches)
    for epoch in range(state["epoch"], train.epochs):
        started = time.perf_counter()
        window: list[list[float]] = []
        micro = 0
        clock = _DataClock(prefetcher.epoch(epoch))
        for inputs, labels, targets in clock:
            logits = task.logits(engine, inputs)
            parts = distillation_loss(
                logits,
                labels,
                targets,
                alpha=loss_spec.alpha,
                temperature=loss_spec.temperature,
                chunk_positions=loss_spec.chunk_positions,
                divergence_spec=divergence,
            )
            engine.backward(parts.total)
            engine.step()
            micro += 1
            window.append([parts.total.item(), parts.kd.item(), parts.ce.item()])
            if not math.isfinite(window[-1][0]):
                raise NonFiniteLoss(
                    f"the loss is {window[-1][0]} at step {state['step'] + 1} (epoch {epoch}, kd "
                    f"{window[-1][1]}, ce {window[-1][2]}); training stopped, nothing is exported"
                )
            if counter is not None:
                counter.add.remote("tokens", tokens_per_micro)
            if micro % train.grad_accum == 0:
                state["step"] += 1
                if state["step"] % log_every == 0 or micro == micro_per_epoch:
                    total, kd, ce = _mean_across_ranks([sum(col) / len(window) for col in zip(*window)])
                    window = []
                    record = {
                        "step": state["step"],
                        "epoch": epoch,
                        "loss": total,
                        "kd": kd,
                        "ce": ce,
                        "lr": engine.get_lr()[0],
                    }
                    state["history"].append(record)
                    if rank == 0 and cfg.get("run_id"):
                        log_step_metrics(
                            cfg["tracking_uri"],
                            cfg["run_id"],
                            {"train/loss": total, "train/kd": kd, "train/ce": ce, "train/lr": record["lr"]},
                            state["step"],
                        )
                if heldout is not None and (
                    state["step"] % train.eval_every_steps == 0 or state["step"] == total_steps
                ):
                    point = {
                        "step": state["step"],
                        "tokens": state["step"] * tokens_per_step,
                        "heldout_ce": heldout_ce(engine, task, heldout, rank, world, train.micro_batch_size, device),
                    }
                    state.setdefault("evals", []).append(point)
                    if rank == 0 and cfg.get("run_id"):
                        log_step_metrics(
                            cfg["tracking_uri"], cfg["run_id"], {"eval/heldout_ce": point["heldout_ce"]}, state["step"]
                        )
        state["epoch"] = epoch + 1
        seconds = time.perf_counter() - started
        tokens = micro * tokens_per_micro * world
        state.setdefault("epochs", []).append(
            {
                "epoch": epoch,
                "seconds": seconds,
                "tokens": tokens,
                "data_seconds": clock.waited,
                "first_batch_seconds": clock.first,
            }
        )
        metrics = {
            "epoch": epoch,
            "step": state["step"],
            "tokens_per_second": tokens / max(seconds, 1e-9),
            "precision": precision,
        }
        if (epoch + 1) % train.checkpoint_every_epochs and epoch + 1 < train.epochs:
            ray.train.report(metrics)  # the same decision on every rank: no collective save is left waiting
            continue
        folder = _save_checkpoint(engine, cfg, state, rank, student_config, task)
        ray.train.report(
            metrics, checkpoint=ray.train.Checkpoint.from_directory(folder), delete_local_checkpoint_after_upload=True
        )
