"""Teacher backends, one module each, behind one registry (``teacher.backend`` in the job spec).
Everything outside this package reaches a teacher through the functions below, so adding a
backend is a module here with a :class:`~kdscale.teachers.base.TeacherBackend` subclass and its
entry in ``BACKENDS`` (see CONTRIBUTING.md).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kdscale.teachers.base import FULL_LOGITS, TeacherBackend, TeacherIdentity
from kdscale.teachers.hf import HuggingFace

if TYPE_CHECKING:
    import torch

    from kdscale.cache.kinds.base import TargetKind
    from kdscale.config import TeacherSpec
    from kdscale.models.shared_weights import SharedWeights

BACKENDS: dict[str, TeacherBackend] = {b.name: b for b in (HuggingFace(),)}

__all__ = ["BACKENDS", "TeacherBackend", "TeacherIdentity", "backend", "serving_problems"]


def backend(spec: TeacherSpec) -> TeacherBackend:
    try:
        return BACKENDS[spec.backend]
    except KeyError:
        raise ValueError(f"unknown teacher backend {spec.backend!r} (known: {', '.join(BACKENDS)})") from None


def serving_problems(b: TeacherBackend, kind: TargetKind, online: list[int]) -> list[tuple[str, str]]:
    """What the job asks of the teacher that its backend cannot return: a target kind that needs
    the full logits (or online students, which need them in the training workers) from a backend
    that only returns top-k log-probs."""
    if FULL_LOGITS in b.outputs:
        return []
    short = f"teacher backend {b.name} returns only {', '.join(sorted(b.outputs))}"
    found = []
    if kind.needs_full_logits:
        found.append(("cache.targets.kind", f"target kind {kind.name} needs the teacher's full logits; {short}"))
    found += [(f"students.{i}.targets", f"online targets need the teacher's full logits; {short}") for i in online]
    return found


def load_tokenizer(spec: TeacherSpec) -> Any:
    return backend(spec).tokenizer(spec)


def load_teacher_config(spec: TeacherSpec, vocab_size: int | None, task: str = "causal_lm") -> Any:
    return backend(spec).config(spec, vocab_size, task)


def load_teacher(
    spec: TeacherSpec, vocab_size: int | None, seed: int, device: str | torch.device = "cpu", task: str = "causal_lm"
) -> torch.nn.Module:
    """The teacher in eval mode on ``device`` with the spec's dtype."""
    return backend(spec).load(spec, vocab_size, seed, device, task)


def teacher_from_weights(spec: TeacherSpec, weights: SharedWeights, task: str = "causal_lm") -> torch.nn.Module:
    """The teacher :func:`load_teacher` makes, on the CPU, around ``weights`` mapped (not copied)."""
    return backend(spec).from_weights(spec, weights, task)


def teacher_identity(spec: TeacherSpec, vocab_size: int | None, seed: int, task: str = "causal_lm") -> TeacherIdentity:
    return backend(spec).identity(spec, vocab_size, seed, task)


def teacher_file_problems(spec: TeacherSpec) -> list[str]:
    return backend(spec).problems(spec)


def load_image_task(spec: TeacherSpec, config: Any, height: int, width: int) -> Any:
    return backend(spec).image_task(spec, config, height, width)
