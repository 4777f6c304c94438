"""The optimizer (AdamW, fused on CUDA, or bitsandbytes' 8-bit / paged variants) and the
learning-rate schedule (transformers' warm-up + constant / linear / cosine)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from fnlm.errors import ArgumentError
from fnlm.train.config import OPTIMIZER_ALIASES, OPTIMIZERS, SCHEDULE_ALIASES, SCHEDULES


def build_optimizer(
    named: Sequence[tuple[str, torch.Tensor]],
    *,
    name: str = "adamw",
    lr: float = 2e-4,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> torch.optim.Optimizer:
    """AdamW over the trainable tensors, with weight decay on matrices only (norm weights and
    biases, the 1-D tensors, get none).

    name: "adamw" (torch; fused kernel on CUDA), or bitsandbytes' "adamw8bit", "paged_adamw",
    "paged_adamw8bit", "paged_adamw32bit" (paged optimizers move their state to CPU under memory
    pressure); transformers' names ("adamw_torch", "adamw_8bit", "paged_adamw_8bit", ...) too.
    Raises ArgumentError for an unknown name or no trainable tensors.
    """
    name = OPTIMIZER_ALIASES.get(name, name)
    tensors = [t for _, t in named]
    if not tensors:
        raise ArgumentError("build_optimizer: there are no trainable tensors")
    decay = [t for t in tensors if t.dim() >= 2]
    no_decay = [t for t in tensors if t.dim() < 2]
    groups = [
        g
        for g in (
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        )
        if g["params"]
    ]
    options = dict(lr=lr, betas=tuple(betas), eps=eps)
    if name == "adamw":
        fused = all(t.is_cuda and t.is_floating_point() for t in tensors)
        return torch.optim.AdamW(groups, fused=fused or None, **options)
    if name not in OPTIMIZERS:
        raise ArgumentError(f"unknown optimizer {name!r}; expected one of {OPTIMIZERS}")
    import bitsandbytes as bnb

    classes = {
        "adamw8bit": bnb.optim.AdamW8bit,
        "paged_adamw": bnb.optim.PagedAdamW,
        "paged_adamw8bit": bnb.optim.PagedAdamW8bit,
        "paged_adamw32bit": bnb.optim.PagedAdamW32bit,
    }
    return classes[name](groups, **options)


def lr_factor(
    step: int, *, schedule: str, warmup: int, total: int, min_ratio: float = 0.0
) -> float:
    """The learning-rate multiplier before optimizer step `step` (0-based), as transformers'
    get_{constant,linear,cosine}_schedule_with_warmup compute it (so step 0 of a warm-up is 0),
    with the decay floored at `min_ratio`."""
    if step < warmup:
        return step / max(1, warmup)
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "linear":
        value = max(0.0, 1.0 - progress)
    elif schedule == "cosine":
        value = max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    else:
        raise ArgumentError(f"unknown schedule {schedule!r}; expected one of {SCHEDULES}")
    return min_ratio + (1.0 - min_ratio) * value


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    *,
    schedule: str,
    total_steps: int,
    warmup_steps: int = 0,
    min_lr_ratio: float = 0.0,
) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR following `lr_factor`; call `.step()` after each optimizer step."""
    schedule = SCHEDULE_ALIASES.get(schedule, schedule)
    if schedule not in SCHEDULES:
        raise ArgumentError(f"unknown schedule {schedule!r}; expected one of {SCHEDULES}")
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: lr_factor(
            step, schedule=schedule, warmup=warmup_steps, total=total_steps, min_ratio=min_lr_ratio
        ),
    )
