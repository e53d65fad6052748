"""What a Ray Train worker is told, as one typed, frozen object: built once on the driver from
the validated spec and handed to every worker as is (it used to cross as a dict that six places
re-validated). No Ray, no DeepSpeed here."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from kdscale.config import LossSpec, TrainSpec
from kdscale.student.targets_source import FromCache, FromTeacher


@dataclass(frozen=True)
class WorkerConfig:
    student: str
    train: TrainSpec
    loss: LossSpec
    targets: FromCache | FromTeacher
    student_config: dict[str, Any]  # the student's transformers config, as to_dict() gives it
    seq_len: int
    seed: int  # the effective seed: the student's, else the job's
    init_path: str | None  # starting weights (None: a seeded fresh init)
    steps_per_epoch: int
    threads: int  # torch threads per worker
    task: dict[str, Any]  # the task's description (kdscale.models.task)
    tracking_uri: str
    run_id: str | None = None  # the student's MLflow run (None: no step metrics)
    counter: Any = None  # a Ray actor handle counting trained tokens for the driver's progress bar
    counter_key: str = "tokens"  # this run's key in it
    heldout: dict[str, np.ndarray] | None = None  # input columns scored every eval_every_steps

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.train.epochs

    @property
    def micro_batches_per_epoch(self) -> int:
        return self.steps_per_epoch * self.train.grad_accum

    @property
    def tokens_per_micro_batch(self) -> int:
        return self.train.micro_batch_size * self.seq_len

    def shuffle_seed(self, epoch: int) -> int:
        """The seed of an epoch's row order (the same on every rank and on a resumed run)."""
        return self.seed * 1000 + epoch
