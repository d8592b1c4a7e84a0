"""Learning-rate scaling with the number of ranks averaged into a step, warmup, and a schedule."""
from __future__ import annotations

import math
from typing import Callable

import torch

from .config import OptimConfig


def lr_scale(rule: str, lr_ranks: int) -> float:
    return {"linear": float(lr_ranks), "sqrt": math.sqrt(lr_ranks), "none": 1.0}[rule]


def scaled_lr(cfg: OptimConfig, lr_ranks: int) -> float:
    """``optim.lr`` scaled for ``lr_ranks`` ranks by ``optim.lr_scaling``."""
    return cfg.lr * lr_scale(cfg.lr_scaling, lr_ranks)


def build_optimizer(params, cfg: OptimConfig, lr_ranks: int) -> torch.optim.Optimizer:
    """The optimizer at the scaled lr; ``lr_ranks``: the ranks whose gradients one step averages."""
    lr = scaled_lr(cfg, lr_ranks)
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    cls = torch.optim.Adam if cfg.name == "adam" else torch.optim.AdamW
    return cls(params, lr=lr, weight_decay=cfg.weight_decay)


def lr_factor(cfg: OptimConfig, lr_ranks: int, steps_per_epoch: int, epochs: int) -> Callable[[int], float]:
    """Multiplier of the scaled lr at optimizer step ``step`` (0-based): warm up from the unscaled
    lr (Goyal et al.), then constant, cosine to zero, or step decay at ``step_epochs``. Pure, so
    a parameter server computes the same lr as the workers' scheduler."""
    scale = lr_scale(cfg.lr_scaling, lr_ranks)
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
    total = max(1, epochs * steps_per_epoch)
    milestones = [e * steps_per_epoch for e in cfg.step_epochs]

    def factor(step: int) -> float:
        if step < warmup:
            return (1.0 / scale) + (1.0 - 1.0 / scale) * step / warmup
        if cfg.schedule == "cosine":
            progress = (step - warmup) / max(1, total - warmup)
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        if cfg.schedule == "step":
            return cfg.gamma ** sum(step >= m for m in milestones)
        return 1.0

    return factor


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, lr_ranks: int,
                    steps_per_epoch: int, epochs: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-optimizer-step schedule of :func:`lr_factor`."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg, lr_ranks, steps_per_epoch, epochs))
