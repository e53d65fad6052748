"""One teacher replica: load the teacher once, then turn shard tasks into written Parquet shards.

Plain Python (the runner wraps it in a Ray actor), so a benchmark or test can drive it directly.
The replica writes its shards itself, so target tensors never travel back through the driver.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

from kdscale.cache import targets as extract
from kdscale.cache.format import EVAL_SPLITS, ShardRecord, TargetsInfo
from kdscale.cache.writer import DEFAULT_ZSTD_LEVEL, write_shard
from kdscale.config import TeacherSpec
from kdscale.data.units import PackedUnit
from kdscale.models.sharding import split
from kdscale.models.shared_weights import SharedWeights
from kdscale.models.task import task_from_dict
from kdscale.precompute.plan import ShardTask
from kdscale.teachers import load_teacher, teacher_from_weights


def pick_device(num_gpus: float) -> torch.device:
    return torch.device("cuda") if num_gpus > 0 and torch.cuda.is_available() else torch.device("cpu")


def _load(
    teacher: TeacherSpec,
    vocab_size: int,
    seed: int,
    layer_range: tuple[int, int] | None,
    task: str = "causal_lm",
    weights: SharedWeights | None = None,
):
    """The whole teacher, or one pipeline stage of it, on this process's device; ``weights``:
    the teacher's weights to map instead of loading its files (shared by every replica on a node)."""
    if teacher.num_cpus >= 1:
        torch.set_num_threads(int(teacher.num_cpus))
    device = pick_device(teacher.num_gpus)
    if weights is not None:
        model = teacher_from_weights(teacher, weights, task)
    else:
        model = load_teacher(teacher, vocab_size, seed, "cpu", task=task)
    if layer_range:
        model = split(model, *layer_range)
    return model.to(device), device


class StageWorker:
    """A middle/first pipeline stage of a sharded teacher: hidden states in, hidden states out."""

    def __init__(
        self,
        teacher: TeacherSpec,
        *,
        vocab_size: int,
        seed: int,
        layer_range: tuple[int, int],
        weights: SharedWeights | None = None,
    ):
        self.model, self.device = _load(teacher, vocab_size, seed, layer_range, weights=weights)

    @torch.inference_mode()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.to(self.device)).cpu()

    def forward_rows(self, task: ShardTask, packed: PackedUnit | None, start: int, stop: int) -> torch.Tensor:
        """The first stage: rows [start, stop) of the task, taken from its packed unit here."""
        ids = task.resolve(packed).input_ids[start:stop] if packed is not None else task.input_ids[start:stop]
        return self.forward(torch.from_numpy(np.asarray(ids, dtype=np.int64)))

    def ready(self) -> bool:
        return True


class TeacherWorker:
    def __init__(
        self,
        teacher: TeacherSpec,
        *,
        vocab_size: int,
        seed: int,
        targets: TargetsInfo,
        cache_uri: str,
        rank: np.ndarray,
        compression_level: int = DEFAULT_ZSTD_LEVEL,
        layer_range: tuple[int, int] | None = None,
        task: dict[str, Any] | None = None,
        weights: SharedWeights | None = None,
    ):
        """The whole teacher, or (``layer_range``) the last stage of a sharded one, which turns
        the previous stage's hidden states into logits. ``task``: the task's description
        (default: causal LM); ``weights``: as for :func:`_load`."""
        self.task = task_from_dict(task or {"name": "causal_lm"})
        self.model, self.device = _load(teacher, vocab_size, seed, layer_range, self.task.name, weights)
        self.sharded = layer_range is not None
        self.batch_size = teacher.batch_size
        self.vocab_size = vocab_size
        self.targets = targets
        self.cache_uri = cache_uri
        self.rank = rank
        self.compression_level = compression_level

    @torch.inference_mode()
    def logits(self, x: torch.Tensor | dict[str, np.ndarray]) -> torch.Tensor:
        """Teacher logits [rows, positions, vocab] in float32 on the teacher's device, sliced to the
        true vocabulary (padded heads have extra columns); a bf16/fp16 teacher's logits are
        extracted in float32. ``x``: a micro-batch's columns, or the previous stage's hidden
        states for a last stage."""
        if isinstance(x, torch.Tensor):  # a sharded last stage: the upstream hidden states
            out = self.model(x.to(self.device))
        else:
            out = self.task.logits(self.model, self.task.model_inputs(x, self.device))
        return out[..., : self.vocab_size].float()  # extraction runs on this device (kdscale.cache.targets)

    def micro_batches(self, task: ShardTask) -> list[dict[str, np.ndarray]]:
        """The shard's rows in micro-batches of the spec's batch size (columns sliced alike)."""
        return [
            {name: col[start : start + self.batch_size] for name, col in task.resolved_columns.items()}
            for start in range(0, task.rows, self.batch_size)
        ]

    def rows(self, task: ShardTask, inputs: Iterable[Any] | None = None) -> list[dict[str, Any]]:
        """Targets for every row of ``task``; ``inputs`` are the micro-batches' model inputs when
        they come from an upstream stage (default: the task's own columns)."""
        t = self.targets
        rows: list[dict[str, Any]] = []
        batches = self.micro_batches(task)
        inputs = batches if inputs is None else inputs
        start = 0
        for batch, x in zip(batches, inputs):
            logits = self.logits(x)
            labels = self.task.labels(batch)
            for i in range(len(labels)):
                sid = task.seq_ids[start + i]
                row: dict[str, Any] = {"seq_id": sid, **{name: col[i] for name, col in batch.items()}}
                row.update(
                    extract.extract_row(
                        t.kind,
                        logits[i],
                        labels[i],
                        temperature=t.temperature,
                        num_samples=t.num_samples or 0,
                        k=t.k or 0,
                        seed=t.seed,
                        sid=sid,
                        store_logprobs=t.store_logprobs,
                        with_top1=task.split in EVAL_SPLITS,
                        draws=t.draws,
                    )
                )
                rows.append(row)
            start += len(labels)
        return rows

    def run(
        self, task: ShardTask, packed: PackedUnit | None = None, inputs: Iterable[torch.Tensor] | None = None
    ) -> ShardRecord:
        """Compute and write one shard; ``packed``: the unit its rows are in (a streamed task)."""
        if packed is not None:
            task = task.resolve(packed)
        return write_shard(
            self.cache_uri,
            task.name,
            task.split,
            task.index,
            self.rows(task, inputs),
            self.targets,
            self.rank,
            self.compression_level,
            self.task.name,
        )

    def ready(self) -> bool:
        return True
