"""DeepSpeed setup for one training worker: the only place (with ``student/``) that imports it.

The optimizer and LR schedule are plain torch objects handed to ``deepspeed.initialize`` so the
same code runs on CPU (where DeepSpeed's fused optimizers would need CUDA builds) and GPU; ZeRO
wraps them either way. Precision: bf16 on GPUs that support it (``auto``), fp32 on CPU.
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch

from kdscale.config import TrainSpec


def select_device(use_gpu: bool) -> torch.device:
    if use_gpu and torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    # DeepSpeed picks its accelerator at import time; without CUDA it must be told to use the CPU.
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    return torch.device("cpu")


def resolve_precision(train: TrainSpec, device: torch.device) -> str:
    if device.type != "cuda":
        return "fp32"
    if train.precision == "auto":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return train.precision


def deepspeed_config(train: TrainSpec, precision: str, world_size: int) -> dict[str, Any]:
    return {
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.grad_accum,
        "train_batch_size": train.micro_batch_size * train.grad_accum * world_size,
        "gradient_clipping": train.grad_clip,
        "zero_optimization": {"stage": train.zero_stage},
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "initial_scale_power": 16},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def warmup_cosine(total_steps: int, warmup_ratio: float, floor: float = 0.1):
    """LR multiplier: linear warmup then cosine decay to ``floor`` of the peak."""
    warmup = max(1, int(round(total_steps * warmup_ratio)))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def make_engine(model: torch.nn.Module, train: TrainSpec, total_steps: int, device: torch.device, world_size: int):
    """``deepspeed.initialize`` with a ZeRO stage, AdamW and a warmup-cosine schedule."""
    import deepspeed

    precision = resolve_precision(train, device)
    model = model.to(device)
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "norm" in name else decay).append(p)
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=train.lr,
        betas=(0.9, 0.95),
        fused=device.type == "cuda",
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(total_steps, train.warmup_ratio))
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=deepspeed_config(train, precision, world_size),
        dist_init_required=False,
    )
    return engine, precision


def full_state_dict(engine, zero_stage: int) -> dict[str, torch.Tensor]:
    """The whole model's weights on CPU (ZeRO-3 partitions parameters, so gather them first)."""
    module = engine.module
    if zero_stage < 3:
        return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
        return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
