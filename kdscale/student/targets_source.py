"""Where a training batch's teacher targets come from (no Ray here).

- :class:`CachedTargets`: decoded from the cache columns of the batch (the normal path).
- :class:`OnlineTeacher`: the teacher runs inside the training worker on every batch and its full
  distribution at temperature T is the target — classic online KD, for comparison and for users
  without a cache. The loss is the same function either way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pyarrow as pa
import torch

from kdscale.cache.format import Manifest
from kdscale.cache.reader import batch_targets, load_rank_order
from kdscale.config import TeacherSpec
from kdscale.targets import DenseTargets, SparseTargets
from kdscale.teachers import load_teacher


class CachedTargets:
    def __init__(self, manifest: Manifest, cache_uri: str, temperature: float | None = None):
        """``temperature``: the loss's; a ``full`` cache is re-tempered to it, other kinds must
        have been captured at it (checked before training)."""
        self.manifest = manifest
        self.temperature = temperature
        self.order = load_rank_order(cache_uri, manifest)
        # a cache with several draws per position gives each epoch its own draw
        self.varies_by_epoch = manifest.targets.draws > 1

    def __call__(
        self, batch: pa.Table, inputs: dict[str, torch.Tensor], epoch: int = 0
    ) -> SparseTargets | DenseTargets:
        return batch_targets(batch, self.manifest, self.order, epoch, self.temperature)


class OnlineTeacher:
    def __init__(self, teacher: TeacherSpec, vocab_size: int, seed: int, temperature: float, device: torch.device):
        self.model = load_teacher(teacher, vocab_size, seed, device)
        self.vocab_size = vocab_size
        self.temperature = temperature

    varies_by_epoch = False

    @torch.no_grad()  # not inference_mode: the loss's backward must be able to save these tensors
    def __call__(self, batch: pa.Table, inputs: dict[str, torch.Tensor], epoch: int = 0) -> DenseTargets:
        logits = self.model(**inputs).logits[..., : self.vocab_size].float()
        return DenseTargets(torch.log_softmax(logits / self.temperature, dim=-1))


@dataclass(frozen=True)
class FromCache:
    """Targets decoded from a committed cache's columns (the worker reads its rank table)."""

    manifest: Manifest
    cache_uri: str
    online: ClassVar[bool] = False

    def open(self, temperature: float, device: torch.device) -> CachedTargets:
        return CachedTargets(self.manifest, self.cache_uri, temperature)


@dataclass(frozen=True)
class FromTeacher:
    """Online KD: each training worker loads the teacher and scores every batch itself."""

    teacher: TeacherSpec
    vocab_size: int
    seed: int
    online: ClassVar[bool] = True

    def open(self, temperature: float, device: torch.device) -> OnlineTeacher:
        return OnlineTeacher(self.teacher, self.vocab_size, self.seed, temperature, device)
