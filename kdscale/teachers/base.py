"""What a teacher backend is: the one object that knows how a kind of teacher is checked, named,
described, tokenized and run. Orchestration (prepare, plan, the precompute actors, online
targets, teacher-layer students) talks to this protocol, never to a loading library, so a backend
that serves its logits another way (a vLLM server returning top-k log-probs) is one new module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    import torch

    from kdscale.config import TeacherSpec
    from kdscale.models.shared_weights import SharedWeights

# What a backend's scorer can return: the full logit vector per position, or only its top-k
# log-probs. Target kinds say which one they need (TargetKind.needs_full_logits).
FULL_LOGITS = "full_logits"
TOP_K = "top_k"


@dataclass(frozen=True)
class TeacherIdentity:
    """The teacher as the cache_id sees it: a content fingerprint (weights + dtype), not a path."""

    name: str
    fingerprint: str
    dtype: str
    source: dict[str, Any]


class TeacherBackend:
    name: ClassVar[str]
    outputs: ClassVar[frozenset[str]]  # FULL_LOGITS and/or TOP_K
    shares_weights: ClassVar[bool] = False  # implements from_weights (replicas map one copy of the weights)

    def problems(self, spec: TeacherSpec) -> list[str]:
        """Cheap checks of the teacher's files (headers, no weights loaded), before any work."""
        return []

    def tokenizer(self, spec: TeacherSpec) -> Any:
        """The teacher's tokenizer: every student shares it, and the cache records its fingerprint."""
        raise NotImplementedError

    def config(self, spec: TeacherSpec, vocab_size: int | None, task: str = "causal_lm") -> Any:
        """The teacher's architecture without its weights (planning, students' configs)."""
        raise NotImplementedError

    def load(
        self, spec: TeacherSpec, vocab_size: int | None, seed: int, device: str | torch.device, task: str
    ) -> torch.nn.Module:
        """The scorer: a module in eval mode on ``device`` whose forward the task turns into
        logits [rows, positions, width]."""
        raise NotImplementedError

    def from_weights(self, spec: TeacherSpec, weights: SharedWeights, task: str) -> torch.nn.Module:
        """The scorer as :meth:`load` makes it (on the CPU), built around ``weights`` (exported from
        a model :meth:`load` made) without copying them."""
        raise NotImplementedError(f"teacher backend {self.name} cannot share weights between replicas")

    def identity(
        self, spec: TeacherSpec, vocab_size: int | None, seed: int, task: str = "causal_lm"
    ) -> TeacherIdentity:
        raise NotImplementedError

    def image_task(self, spec: TeacherSpec, config: Any, height: int, width: int) -> Any:
        """For image classifiers: the label names, channels and normalisation the teacher defines."""
        raise NotImplementedError(f"teacher backend {self.name} serves no image classifiers")
