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
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

from kdscale.config import TrainSpec
from kdscale.models.task import Task, table_arrays, task_from_dict
from kdscale.student.cross_losses import cross_tokenizer_loss
from kdscale.student.local_checkpoints import new_folder
from kdscale.student.losses import Divergence, distillation_loss, nll_sum
from kdscale.student.worker_config import WorkerConfig
from kdscale.targets import AlignedTargets

STATE_FILE = "kdscale_state.json"
HF_DIR = "hf"
DS_DIR = "deepspeed"


class NonFiniteLoss(RuntimeError):
    """A student whose loss went inf or nan: its weights are garbage from here on, so the run
    fails instead of finishing, exporting and registering them (``lr: .inf`` once did)."""


def steps_per_epoch(train_rows: int, train: TrainSpec) -> int:
    """Optimizer steps per epoch: rows are split equally over workers, partial batches dropped."""
    per_worker = train_rows // train.num_workers
    return (per_worker // train.micro_batch_size) // train.grad_accum


def across_ranks(values: list[float], device: torch.device | None = None, mean: bool = False) -> list[float]:
    """``values`` summed (``mean``: averaged) over every rank. The tensor is made on the training
    ``device``: NCCL, the GPU backend, reduces CUDA tensors only (a CPU tensor failed every GPU
    student with "No backend type associated with device type cpu" on an H200, 2026-12-04), gloo
    CPU ones."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(t)
        if mean:
            t /= torch.distributed.get_world_size()
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
    total_nll, total_count = across_ranks([nll, count], device)
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


def train_loop_per_worker(config: dict[str, WorkerConfig]) -> None:
    """Ray Train's entry point on every worker: ``config["worker"]`` is the driver's WorkerConfig."""
    _WorkerRun(config["worker"]).run()


class _WorkerRun:
    """One worker's training, in named steps: build, restore, epochs of steps (with logging and
    held-out evaluation), checkpoint."""

    def __init__(self, cfg: WorkerConfig):
        import ray.train

        self.cfg, self.train = cfg, cfg.train
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        torch.set_num_threads(max(1, cfg.threads))
        self.start_reading()
        self.build()

    def worker_nodes(self) -> list[str]:
        """``IP/node-id`` of every rank (a collective): where the student trained, for its summary."""
        import ray
        import ray.util

        ip = f"{ray.util.get_node_ip_address()}/{ray.get_runtime_context().get_node_id()[:12]}"
        if self.world == 1 or not torch.distributed.is_initialized():
            return [ip]
        nodes: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(nodes, ip)
        return nodes

    def start_reading(self) -> None:
        """Start streaming this worker's batches before the model exists: Ray Data's pipeline
        start-up (its coordinator and read tasks starting: 19 s of a tiny job's first epoch on this
        2-core machine, against 5 s for a later epoch) then overlaps the imports, the model build
        and DeepSpeed's initialization instead of following them."""
        import ray.train

        from kdscale.student.engine import select_device

        self.device = select_device(self.train.use_gpu)
        self.targets_for = self.cfg.targets.open(self.cfg.loss.temperature, self.device)
        self.task = task_from_dict(self.cfg.task)
        self.shard = ray.train.get_dataset_shard("train")
        self.preloaded: list = []
        self.heldout: dict | None = None
        self.checkpoint = ray.train.get_checkpoint()  # Ray Train's latest, on a restarted worker group
        self.state: dict[str, Any] = self.saved_state() or {"epoch": 0, "step": 0, "history": []}
        epochs = range(self.state["epoch"], self.train.epochs)
        self.prefetcher = _Prefetcher(self.epoch_batches, epochs, self.train.prefetch_batches)

    def build(self) -> None:
        from transformers import AutoConfig

        from kdscale.models.student import build_student
        from kdscale.student.engine import make_engine

        cfg = self.cfg
        config_dict = dict(cfg.student_config)
        self.student_config = AutoConfig.for_model(config_dict.pop("model_type"), **config_dict)
        model = build_student(self.student_config, cfg.seed, cfg.init_path, self.task)
        self.engine, self.precision = make_engine(model, self.train, cfg.total_steps, self.device, self.world)
        self.divergence = Divergence(cfg.loss.divergence, beta=cfg.loss.jsd_beta, skew=cfg.loss.skew)

    def run(self) -> None:
        self.restore()
        self.state["nodes"] = self.worker_nodes()
        for epoch in range(self.state["epoch"], self.train.epochs):
            metrics = self.train_epoch(epoch, self.prefetcher.epoch(epoch))
            self.end_epoch(epoch, metrics)

    # restore ------------------------------------------------------------------------------------

    def saved_state(self) -> dict[str, Any] | None:
        """The training state (epoch, step, history) in the latest checkpoint, if there is one."""
        if not self.checkpoint:
            return None
        with self.checkpoint.as_directory() as d, open(os.path.join(d, STATE_FILE)) as f:
            return json.load(f)

    def restore(self) -> None:
        """Continue from the latest checkpoint's DeepSpeed state (a restarted worker group)."""
        if not self.checkpoint:
            return
        with self.checkpoint.as_directory() as d:
            self.engine.load_checkpoint(os.path.join(d, DS_DIR), tag="ckpt")
        self.state.setdefault("resumed_at_epochs", []).append(self.state["epoch"])

    # data ---------------------------------------------------------------------------------------

    def batches(self, epoch: int, decode: bool = True) -> Iterator:
        """(model inputs, labels, targets) for this rank's share of one epoch, equal in count on
        every rank (or the collectives would hang); with ``decode=False`` the stored batch
        instead of targets."""
        train, task = self.train, self.task
        stream = self.shard.iter_batches(
            batch_size=train.micro_batch_size,
            batch_format="pyarrow",
            drop_last=True,
            local_shuffle_buffer_size=4 * train.micro_batch_size,
            local_shuffle_seed=self.cfg.shuffle_seed(epoch),
        )
        for n, batch in enumerate(stream):
            if n >= self.cfg.micro_batches_per_epoch:
                break
            arrays = task.expand(table_arrays(batch, task.input_columns))
            inputs, labels = task.model_inputs(arrays, self.device), task.labels(arrays, self.device)
            yield inputs, labels, (self.targets(batch, arrays, inputs, epoch) if decode else (batch, arrays))

    def targets(self, batch, arrays: dict, inputs: dict, epoch: int):
        """The teacher's targets for a batch, as the task's loss takes them."""
        return self.task.gather_targets(self.targets_for(batch, inputs, epoch), arrays)

    def epoch_batches(self, epoch: int) -> Iterator:
        """One epoch's batches: streamed, or (``preload``) from the worker's share read once and
        kept, in a seeded order per epoch (decoded again per epoch when each epoch has its own draw)."""
        if not self.train.preload:
            yield from self.batches(epoch)
            return
        per_epoch = self.targets_for.varies_by_epoch
        if not self.preloaded:
            # read in epoch 0's stream order whatever epoch this run starts at, so the seeded
            # permutations below pick the same batches after a resume as in an uninterrupted run
            # (read at the resumed epoch's order instead, 47 of 60 losses of the tiny job differed)
            self.preloaded.extend(self.batches(0, decode=not per_epoch))
        generator = torch.Generator().manual_seed(self.cfg.shuffle_seed(epoch))
        for i in torch.randperm(len(self.preloaded), generator=generator).tolist():
            inputs, labels, stored = self.preloaded[i]
            yield inputs, labels, self.targets(stored[0], stored[1], inputs, epoch) if per_epoch else stored

    # steps --------------------------------------------------------------------------------------

    def train_epoch(self, epoch: int, items: Iterable) -> dict[str, Any]:
        """Train on one epoch's micro-batches; returns the metrics Ray Train is told."""
        started = time.perf_counter()
        window: list[list[float]] = []
        micro = 0
        clock = _DataClock(items)
        for inputs, labels, targets in clock:
            window.append(self.micro_step(epoch, inputs, labels, targets))
            micro += 1
            if micro % self.train.grad_accum:
                continue
            self.state["step"] += 1
            if self.state["step"] % self.train.log_every == 0 or micro == self.cfg.micro_batches_per_epoch:
                self.log(epoch, window)
                window = []
            if self.eval_due():
                self.evaluate()
        self.state["epoch"] = epoch + 1
        seconds = time.perf_counter() - started
        tokens = micro * self.cfg.tokens_per_micro_batch * self.world
        self.state.setdefault("epochs", []).append(
            {
                "epoch": epoch,
                "seconds": seconds,
                "tokens": tokens,
                "data_seconds": clock.waited,
                "first_batch_seconds": clock.first,
            }
        )
        return {
            "epoch": epoch,
            "step": self.state["step"],
            "tokens_per_second": tokens / max(seconds, 1e-9),
            "precision": self.precision,
        }

    def micro_step(self, epoch: int, inputs, labels, targets) -> list[float]:
        """Loss, backward and (at the accumulation boundary, inside DeepSpeed) the optimizer step;
        returns [total, kd, ce]. A non-finite loss stops the run."""
        parts = self.loss(self.task.logits(self.engine, inputs), labels, targets)
        self.engine.backward(parts.total)
        self.engine.step()
        values = [parts.total.item(), parts.kd.item(), parts.ce.item()]
        if not math.isfinite(values[0]):
            raise NonFiniteLoss(
                f"the loss is {values[0]} at step {self.state['step'] + 1} (epoch {epoch}, kd "
                f"{values[1]}, ce {values[2]}); training stopped, nothing is exported"
            )
        if self.cfg.counter is not None:
            self.cfg.counter.add.remote(self.cfg.counter_key, self.cfg.tokens_per_micro_batch)
        return values

    def loss(self, logits, labels, targets):
        """The spec's loss: the cross-tokenizer one for a student with its own tokenizer."""
        loss = self.cfg.loss
        if isinstance(targets, AlignedTargets):
            return cross_tokenizer_loss(
                logits,
                labels,
                targets.targets,
                targets.aligned.to(logits.device),
                alpha=loss.alpha,
                temperature=loss.temperature,
                method=loss.cross_tokenizer,
                vocab_map=getattr(self.task, "vocab_map", None),
                chunk_positions=loss.chunk_positions,
            )
        return distillation_loss(
            logits,
            labels,
            targets,
            alpha=loss.alpha,
            temperature=loss.temperature,
            chunk_positions=loss.chunk_positions,
            divergence_spec=self.divergence,
        )

    def log(self, epoch: int, window: list[list[float]]) -> None:
        """The window's mean losses over all ranks, into the history and (rank 0) MLflow."""
        from kdscale.tracking.lineage import log_step_metrics

        total, kd, ce = across_ranks([sum(col) / len(window) for col in zip(*window)], self.device, mean=True)
        record = {"step": self.state["step"], "epoch": epoch, "loss": total, "kd": kd, "ce": ce}
        record["lr"] = self.engine.get_lr()[0]
        self.state["history"].append(record)
        if self.rank == 0 and self.cfg.run_id:
            metrics = {"train/loss": total, "train/kd": kd, "train/ce": ce, "train/lr": record["lr"]}
            log_step_metrics(self.cfg.tracking_uri, self.cfg.run_id, metrics, self.state["step"])

    # evaluate -----------------------------------------------------------------------------------

    def eval_due(self) -> bool:
        step, every = self.state["step"], self.train.eval_every_steps
        return self.cfg.heldout is not None and bool(every) and (step % every == 0 or step == self.cfg.total_steps)

    def evaluate(self) -> None:
        """Held-out CE of the model being trained, every ``eval_every_steps`` and at the end."""
        from kdscale.tracking.lineage import log_step_metrics

        assert self.cfg.heldout is not None
        if self.heldout is None:  # the student's rows of the held-out split, made once
            self.heldout = self.task.expand(self.cfg.heldout)
        step = self.state["step"]
        ce = heldout_ce(
            self.engine, self.task, self.heldout, self.rank, self.world, self.train.micro_batch_size, self.device
        )
        point = {"step": step, "tokens": step * self.cfg.tokens_per_micro_batch * self.train.grad_accum * self.world}
        point["heldout_ce"] = ce
        self.state.setdefault("evals", []).append(point)
        if self.rank == 0 and self.cfg.run_id:
            log_step_metrics(self.cfg.tracking_uri, self.cfg.run_id, {"eval/heldout_ce": ce}, step)

    # checkpoint ---------------------------------------------------------------------------------

    def end_epoch(self, epoch: int, metrics: dict[str, Any]) -> None:
        """Report the epoch to Ray Train, with a checkpoint every ``checkpoint_every_epochs`` and
        after the last (the same decision on every rank: no collective save is left waiting)."""
        import ray.train

        if (epoch + 1) % self.train.checkpoint_every_epochs and epoch + 1 < self.train.epochs:
            ray.train.report(metrics)
            return
        folder = self.save_checkpoint()
        ray.train.report(
            metrics, checkpoint=ray.train.Checkpoint.from_directory(folder), delete_local_checkpoint_after_upload=True
        )

    def save_checkpoint(self) -> str:
        """A checkpoint folder (Ray Train moves it into the run's storage and deletes it; one a
        killed worker left is removed by the next save: :mod:`kdscale.student.local_checkpoints`);
        the state records how long the save took, so its cost shows beside the epochs'
        (``checkpoint_seconds``)."""
        from kdscale.student.engine import full_state_dict

        started = time.perf_counter()
        folder = new_folder(self.cfg.student)
        self.engine.save_checkpoint(os.path.join(folder, DS_DIR), tag="ckpt")
        weights = full_state_dict(self.engine, self.train.zero_stage)  # collective under ZeRO-3
        if self.rank == 0:
            model = self.task.auto_model().from_config(self.student_config)
            model.load_state_dict(weights)
            model.save_pretrained(os.path.join(folder, HF_DIR), safe_serialization=True)
            self.state["epochs"][-1]["checkpoint_seconds"] = time.perf_counter() - started
            with open(os.path.join(folder, STATE_FILE), "w") as f:
                json.dump(self.state, f)
        return folder
