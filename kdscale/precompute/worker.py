"""One teacher replica: load the teacher once, then turn shard tasks into written Parquet shards.

Plain Python (the runner wraps it in a Ray actor), so a benchmark or test can drive it directly.
The replica writes its shards itself, so target tensors never travel back through the driver.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from kdscale.cache import targets as extract
from kdscale.cache.format import ShardRecord, TargetsInfo
from kdscale.cache.writer import DEFAULT_ZSTD_LEVEL, write_shard
from kdscale.config import TeacherSpec
from kdscale.models.teacher import load_teacher
from kdscale.precompute.plan import ShardTask


def pick_device(num_gpus: float) -> torch.device:
    return torch.device("cuda") if num_gpus > 0 and torch.cuda.is_available() else torch.device("cpu")


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
    ):
        if teacher.num_cpus >= 1:
            torch.set_num_threads(int(teacher.num_cpus))
        self.device = pick_device(teacher.num_gpus)
        self.model = load_teacher(teacher, vocab_size, seed, self.device)
        self.batch_size = teacher.batch_size
        self.vocab_size = vocab_size
        self.targets = targets
        self.cache_uri = cache_uri
        self.rank = rank
        self.compression_level = compression_level

    @torch.inference_mode()
    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Teacher logits sliced to the true vocabulary (padded heads have extra columns)."""
        out = self.model(input_ids=input_ids.to(self.device)).logits
        return out[..., : self.vocab_size].float().cpu()

    def rows(self, task: ShardTask) -> list[dict[str, Any]]:
        t = self.targets
        rows: list[dict[str, Any]] = []
        ids = torch.from_numpy(np.array(task.input_ids, dtype=np.int64))
        for start in range(0, ids.shape[0], self.batch_size):
            batch = ids[start : start + self.batch_size]
            logits = self.logits(batch)
            for i in range(batch.shape[0]):
                sid = task.seq_ids[start + i]
                row: dict[str, Any] = {"seq_id": sid, "input_ids": task.input_ids[start + i]}
                nll, top1 = extract.teacher_nll_and_top1(logits[i], batch[i])
                row["teacher_nll"] = nll
                if task.split == "heldout":
                    row["teacher_top1"] = top1
                row.update(
                    extract.extract(
                        t.kind,
                        logits[i],
                        temperature=t.temperature,
                        num_samples=t.num_samples or 0,
                        k=t.k or 0,
                        seed=t.seed,
                        sid=sid,
                        store_logprobs=t.store_logprobs,
                    )
                )
                rows.append(row)
        return rows

    def run(self, task: ShardTask) -> ShardRecord:
        return write_shard(
            self.cache_uri, task.name, task.split, task.index, self.rows(task), self.targets, self.rank, self.compression_level
        )

    def ready(self) -> bool:
        return True
