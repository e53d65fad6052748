"""Student construction: a config derived from the teacher's (same family, same tokenizer) with
the spec's size overrides, or a pretrained folder. Unknown architecture fields are errors —
transformers configs accept any keyword silently, which would hide a typo like ``hiden_size``."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from kdscale import fs
from kdscale.config import JobSpec, StudentSpec
from kdscale.models.task import CausalLM, Task

if TYPE_CHECKING:
    from transformers import PreTrainedModel

from kdscale.models.arch import architecture_dict, shape_problems, unknown_fields

# Derived from other fields unless the user sets them explicitly: head_dim from hidden_size /
# num_attention_heads; a vision backbone's stage names and outputs from its depths.
DERIVED_FIELDS = ("head_dim", "stage_names", "out_features", "out_indices")


def selected_layers(spec: StudentSpec, teacher_config) -> list[int]:
    """init=teacher_layers: which teacher layers the student starts from (validated)."""
    n = teacher_config.num_hidden_layers
    layers = spec.teacher_layers if spec.teacher_layers is not None else list(range(0, n, 2))
    bad = [i for i in layers if not 0 <= i < n]
    if bad or not layers or len(set(layers)) != len(layers):
        raise ValueError(f"teacher_layers must be distinct indices in [0, {n}), got {layers}")
    return sorted(layers)


def student_config(spec: StudentSpec, teacher_config, vocab_size: int, task: Task = CausalLM()):
    """The student's transformers config (its output size: the tokenizer's vocabulary, or the
    task's classes); raises ValueError naming every unknown field."""
    from transformers import AutoConfig

    if spec.init == "pretrained":
        return _checked(AutoConfig.from_pretrained(spec.path))
    base = architecture_dict(teacher_config)
    if spec.init == "teacher_layers":
        model_type = base.pop("model_type")
        base.update(num_hidden_layers=len(selected_layers(spec, teacher_config)), vocab_size=vocab_size)
        return AutoConfig.for_model(model_type, **base)
    overrides = dict(spec.architecture)
    model_type = overrides.pop("model_type", base.pop("model_type"))
    base.pop("model_type", None)
    unknown = unknown_fields(model_type, overrides)
    if unknown:
        raise ValueError(f"unknown {model_type} config field(s): {', '.join(unknown)}")
    for key in DERIVED_FIELDS:
        if key not in overrides:
            base.pop(key, None)
    base.update(overrides)
    task.set_output_size(base, vocab_size)
    return _checked(build_config(model_type, base))


def build_config(model_type: str, fields: dict[str, Any]):
    """A transformers config, its own validation errors (any exception type) as a ValueError."""
    from transformers import AutoConfig

    try:
        return AutoConfig.for_model(model_type, **fields)
    except Exception as e:  # e.g. StrictDataclassClassValidationError, not a ValueError
        raise ValueError(str(e).strip().splitlines()[-1].strip().removeprefix("ValueError: ")) from None


def _checked(config):
    problems = shape_problems(config)
    if problems:
        raise ValueError("; ".join(problems))
    return config


# torch's default generator is one per process: students trained at once build their untrained
# copies on the driver from several threads, and a seed set by one would be drawn by the other
_SEEDED = threading.Lock()


def build_student(config, seed: int, path: str | None = None, task: Task = CausalLM()) -> torch.nn.Module:
    """A fresh student (seeded, so every worker and every rerun starts from the same weights) or
    one saved at ``path`` (a pretrained student, or a teacher-layers initialisation; any URI)."""
    auto = task.auto_model()
    if path:
        return auto.from_pretrained(fs.local_copy(path), dtype=torch.float32)
    with _SEEDED:
        torch.manual_seed(seed)
        return auto.from_config(config, dtype=torch.float32)


def from_teacher_layers(teacher: torch.nn.Module, config, layers: list[int]) -> PreTrainedModel:
    """A student holding copies of the teacher's embeddings, the chosen decoder layers, final
    norm and head (DistilBERT's initialisation), sliced to the true vocabulary."""
    from transformers import AutoModelForCausalLM

    student = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    vocab = config.vocab_size
    rename = {f"model.layers.{old}.": f"model.layers.{new}." for new, old in enumerate(layers)}
    state = {}
    for key, value in teacher.state_dict().items():
        if key.startswith("model.layers."):
            prefix = ".".join(key.split(".")[:3]) + "."
            if prefix not in rename:
                continue
            key = rename[prefix] + key[len(prefix) :]
        if key in ("model.embed_tokens.weight", "lm_head.weight"):
            value = value[:vocab]
        state[key] = value.detach().float().clone()
    missing, unexpected = student.load_state_dict(state, strict=False)
    if unexpected or [m for m in missing if not (m == "lm_head.weight" and config.tie_word_embeddings)]:
        raise ValueError(f"teacher weights do not fit the student: missing {missing}, unexpected {unexpected}")
    return student


def count_parameters(config, task: Task = CausalLM()) -> int:
    """Parameters of a model with this config, counted on the meta device (nothing allocated)."""
    with torch.device("meta"):
        model = task.auto_model().from_config(config)
    return sum(p.numel() for p in model.parameters())


def describe(config) -> dict[str, Any]:
    """The size-defining fields of a config (transformer LMs; convolutional classifiers)."""
    lm = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")
    if getattr(config, "vocab_size", None) is not None or getattr(config, "hidden_size", None) is not None:
        return {k: getattr(config, k, None) for k in lm}
    vision = ("model_type", "embedding_size", "hidden_sizes", "depths", "num_labels")
    return {k: getattr(config, k) for k in vision if getattr(config, k, None) is not None}


def write_teacher_layer_inits(
    spec: JobSpec,
    vocab_size: int,
    teacher_config,
    student_configs: dict[str, Any],
    init_uri: Callable[[StudentSpec], str],
) -> None:
    """Build and save (at ``init_uri(student)``) the starting weights of every init=teacher_layers
    student; the teacher is loaded once, in this process, only when such a student exists."""
    import tempfile

    from kdscale.progress import say
    from kdscale.teachers import load_teacher

    wanted = [s for s in spec.students if s.init == "teacher_layers"]
    if not wanted:
        return
    teacher = load_teacher(spec.teacher, vocab_size, spec.seed)
    for s in wanted:
        layers = selected_layers(s, teacher_config)
        student = from_teacher_layers(teacher, student_configs[s.name], layers)
        with tempfile.TemporaryDirectory() as tmp:
            student.save_pretrained(tmp, safe_serialization=True)
            fs.remove(init_uri(s))
            fs.put_dir(tmp, init_uri(s))
        say(f"Student {s.name}: initialised from teacher layers {layers}")
