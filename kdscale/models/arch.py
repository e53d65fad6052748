"""Checks and views of a transformers config shared by teachers and students: transformers
accepts any keyword silently and fails on bad attention shapes only once a model is built, so
both are checked here before any work."""

from __future__ import annotations

from typing import Any

# Config fields that describe how a checkpoint was stored, not the architecture a student inherits.
NON_ARCH_FIELDS = (
    "quantization_config",
    "_name_or_path",
    "architectures",
    "transformers_version",
    "dtype",
    "torch_dtype",
)


def unknown_fields(model_type: str, fields: dict[str, Any]) -> list[str]:
    """Fields a transformers config of ``model_type`` does not have (it would accept and ignore
    them, hiding a typo like ``hiden_size``)."""
    from transformers import AutoConfig

    try:
        known = set(AutoConfig.for_model(model_type).to_dict()) | {"num_labels"}  # num_labels: sets id2label
    except ValueError as e:  # transformers names the model types it knows
        raise ValueError(f"unknown model_type {model_type!r} ({str(e)[:120]})") from None
    return sorted(k for k in fields if k not in known)


def shape_problems(config) -> list[str]:
    """Attention shapes that would only fail (with a reshape error) once a model is built: heads
    must divide the hidden size, and key/value heads the heads."""
    heads = getattr(config, "num_attention_heads", None)
    hidden = getattr(config, "hidden_size", None)
    kv = getattr(config, "num_key_value_heads", None)
    if not isinstance(heads, int) or not isinstance(hidden, int):
        return []
    problems = []
    if heads < 1 or hidden < 1:
        return [f"hidden_size ({hidden}) and num_attention_heads ({heads}) must be positive"]
    if getattr(config, "head_dim", None) in (None, hidden // heads) and hidden % heads:
        problems.append(f"num_attention_heads ({heads}) does not divide hidden_size ({hidden})")
    if isinstance(kv, int) and (kv < 1 or heads % kv):
        problems.append(f"num_key_value_heads ({kv}) does not divide num_attention_heads ({heads})")
    return problems


def architecture_dict(config) -> dict[str, Any]:
    """A config's architecture fields, minus storage details (quantization, dtype, origin)."""
    d = config.to_dict()
    for key in NON_ARCH_FIELDS:
        d.pop(key, None)
    return d
