"""Splitting one teacher into pipeline stages by contiguous layer ranges (no Ray here).

Stage 0 holds the token embeddings, the last stage the final norm and the LM head; every stage
keeps the model's own forward code (causal mask, rotary embeddings) by running the base model with
its ``layers`` list cut to the stage's range and, after stage 0, with ``inputs_embeds`` set to the
previous stage's hidden states. That keeps the sharded output equal to the unsharded one (tested
to 1e-5 in fp32) for decoder-only families whose base model does not rescale ``inputs_embeds``
(Llama, Mistral, Qwen2, SmolLM, Phi-3 ...); a teacher without ``model.layers`` is refused.

Cut points balance estimated compute: each decoder layer costs its projection MACs, the LM head
``hidden x vocab`` (for SmolLM2-135M the head alone is worth ~7 of its 30 layers).
"""

from __future__ import annotations

import torch
from torch import nn


class ShardingError(ValueError):
    pass


def layer_cost(config) -> float:
    """Multiply-accumulates per token of one decoder layer (attention projections + MLP)."""
    h = config.hidden_size
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or h // heads
    attention = h * heads * head_dim * 2 + h * kv * head_dim * 2
    mlp = 3 * h * getattr(config, "intermediate_size", 4 * h)
    return float(attention + mlp)


def head_cost(config) -> float:
    return float(config.hidden_size * config.vocab_size)


def layer_ranges(config, shards: int) -> list[tuple[int, int]]:
    """Contiguous [start, end) layer ranges, one per stage, minimising the costliest stage."""
    if shards == 1:
        return [(0, int(getattr(config, "num_hidden_layers", 0) or 0))]
    n = config.num_hidden_layers
    if shards < 1 or shards > n:
        raise ShardingError(f"cannot split {n} layers into {shards} stages (need 1 <= shards <= {n})")
    costs = [layer_cost(config)] * n
    costs[-1] += head_cost(config)  # the last stage also runs the LM head
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    # best[s][i]: minimal max-stage cost splitting the first i layers into s stages
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(shards + 1)]
    cut = [[0] * (n + 1) for _ in range(shards + 1)]
    best[0][0] = 0.0
    for s in range(1, shards + 1):
        for i in range(s, n + 1):
            for j in range(s - 1, i):
                value = max(best[s - 1][j], prefix[i] - prefix[j])
                if value < best[s][i]:
                    best[s][i], cut[s][i] = value, j
    ranges, end = [], n
    for s in range(shards, 0, -1):
        start = cut[s][end]
        ranges.append((start, end))
        end = start
    return ranges[::-1]


def decoder_parts(model: nn.Module):
    base = getattr(model, "model", None)
    layers = getattr(base, "layers", None)
    if not isinstance(layers, nn.ModuleList) or not hasattr(base, "norm") or not hasattr(model, "lm_head"):
        raise ShardingError(
            f"{type(model).__name__} has no model.layers / model.norm / lm_head: sharding supports "
            "decoder-only models laid out like Llama"
        )
    return base, layers


class TeacherStage(nn.Module):
    """Layers [start, end) of a causal LM. Input: token ids (first stage) or hidden states;
    output: hidden states, or logits for the last stage."""

    def __init__(self, model: nn.Module, start: int, end: int):
        super().__init__()
        base, layers = decoder_parts(model)
        self.first, self.last = start == 0, end == len(layers)
        self.start, self.end = start, end
        base.layers = nn.ModuleList(list(layers)[start:end])
        if not self.last:
            base.norm = nn.Identity()  # the final norm belongs to the last stage only
        if not self.first and not (self.last and _tied(model)):
            base.embed_tokens = None  # unused after stage 0 (kept when the head shares its weight)
        self.base = base
        self.lm_head = model.lm_head if self.last else None
        self.config = model.config

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.first:
            hidden = self.base(input_ids=x, use_cache=False).last_hidden_state
        else:
            hidden = self.base(inputs_embeds=x, use_cache=False).last_hidden_state
        return self.lm_head(hidden) if self.last else hidden  # type: ignore[operator]  # a Module when last


def _tied(model: nn.Module) -> bool:
    emb = getattr(model.model, "embed_tokens", None)
    return emb is not None and model.lm_head.weight is emb.weight  # type: ignore[union-attr]


def split(model: nn.Module, start: int, end: int) -> TeacherStage:
    """Cut ``model`` (in place) down to one stage; the dropped layers are freed."""
    return TeacherStage(model, start, end).eval()
