"""Learning-rate scaling with the number of data-parallel ranks, warmup, and a schedule."""
from __future__ import annotations

import math

import torch

from .config import OptimConfig


def lr_scale(rule: str, dp_size: int) -> float:
    return {"linear": float(dp_size), "sqrt": math.sqrt(dp_size), "none": 1.0}[rule]


def build_optimizer(params, cfg: OptimConfig, dp_size: int) -> torch.optim.Optimizer:
    lr = cfg.lr * lr_scale(cfg.lr_scaling, dp_size)
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    cls = torch.optim.Adam if cfg.name == "adam" else torch.optim.AdamW
    return cls(params, lr=lr, weight_decay=cfg.weight_decay)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, dp_size: int,
                    steps_per_epoch: int, epochs: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-optimizer-step multiplier of the scaled lr: warm up from the unscaled lr (Goyal et
    al.), then constant, cosine to zero, or step decay at ``step_epochs``."""
    scale = lr_scale(cfg.lr_scaling, dp_size)
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

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
