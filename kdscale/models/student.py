"""Student construction: a config derived from the teacher's (same family, same tokenizer) with
the spec's size overrides, or a pretrained folder. Unknown architecture fields are errors —
transformers configs accept any keyword silently, which would hide a typo like ``hiden_size``."""

from __future__ import annotations

from typing import Any

import torch

from kdscale.config import StudentSpec
from kdscale.models.teacher import architecture_dict

# Derived from hidden_size / num_attention_heads unless the user sets it explicitly.
DERIVED_FIELDS = ("head_dim",)


def student_config(spec: StudentSpec, teacher_config, vocab_size: int):
    """The student's transformers config; raises ValueError naming every unknown field."""
    from transformers import AutoConfig

    if spec.init == "pretrained":
        return AutoConfig.from_pretrained(spec.path)
    base = architecture_dict(teacher_config)
    overrides = dict(spec.architecture)
    model_type = overrides.pop("model_type", base.pop("model_type"))
    base.pop("model_type", None)
    known = set(AutoConfig.for_model(model_type).to_dict())
    unknown = sorted(k for k in overrides if k not in known)
    if unknown:
        raise ValueError(f"unknown {model_type} config field(s): {', '.join(unknown)}")
    for key in DERIVED_FIELDS:
        if key not in overrides:
            base.pop(key, None)
    base.update(overrides)
    base["vocab_size"] = vocab_size
    return AutoConfig.for_model(model_type, **base)


def build_student(config, seed: int, path: str | None = None) -> torch.nn.Module:
    """A fresh student (seeded, so every worker and every rerun starts from the same weights) or a
    pretrained one."""
    from transformers import AutoModelForCausalLM

    if path:
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def describe(config) -> dict[str, Any]:
    keys = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")
    return {k: getattr(config, k, None) for k in keys}
