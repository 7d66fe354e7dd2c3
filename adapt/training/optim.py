"""The optimizer and learning-rate schedule of a recipe: AdamW, linear warmup, cosine/linear decay."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from adapt.core.errors import AdaptError
from adapt.training.config import Recipe


def build_optimizer(loss_module: nn.Module, recipe: Recipe) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters; no weight decay on biases, norms and embeddings rows of 1D."""
    t = recipe.training
    decay, no_decay = [], []
    for p in loss_module.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    if not decay and not no_decay:
        raise AdaptError("the model has no trainable parameters")
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=t.lr, betas=tuple(t.betas))


def lr_factor(step: int, warmup: int, total: int, schedule: str, min_ratio: float) -> float:
    """Multiplier of the peak lr at `step`: linear warmup, then cosine/linear decay to min_ratio."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    shape = 0.5 * (1.0 + math.cos(math.pi * progress)) if schedule == "cosine" else 1.0 - progress
    return min_ratio + (1.0 - min_ratio) * shape


def build_scheduler(optimizer: torch.optim.Optimizer, recipe: Recipe, total: int) -> Any:
    t = recipe.training
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, t.warmup_steps, total, t.schedule, t.min_lr_ratio)
    )
