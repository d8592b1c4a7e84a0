"""Built-in models: an MLP and a small ResNet-style CNN. A user may pass any nn.Module instead.

Both can recompute activations (``model.recompute``): the forward pass keeps only each block's
input and the backward pass runs the block again (``torch.utils.checkpoint``, non-reentrant,
with the RNG state preserved, so dropout draws the same mask). The parameter names are the same
either way, so a checkpoint written with one setting loads with the other.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import ModelConfig


def recomputed(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, modules: nn.Module) -> torch.Tensor:
    """``fn(x)``, its activations recomputed in backward. BatchNorm running statistics inside
    ``modules`` are updated once, as without recomputation: the second run puts them back."""
    bns = [m for m in modules.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    runs = [0]

    def run(inp: torch.Tensor) -> torch.Tensor:
        runs[0] += 1
        if runs[0] == 1 or not bns:
            return fn(inp)
        saved = [[b.clone() for b in m.buffers()] for m in bns]
        try:
            return fn(inp)
        finally:  # also when checkpoint stops the recomputation early (it raises inside fn)
            with torch.no_grad():
                for m, kept in zip(bns, saved):
                    for b, k in zip(m.buffers(), kept):
                        b.copy_(k)

    return checkpoint(run, x, use_reentrant=False)


class MLP(nn.Module):
    def __init__(self, in_features: int, hidden: list[int], classes: int, dropout: float = 0.0,
                 recompute: bool = False) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        self.cuts = []  # where each hidden block (Linear, ReLU[, Dropout]) ends
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            if dropout:
                layers.append(nn.Dropout(dropout))
            self.cuts.append(len(layers))
            width = h
        layers.append(nn.Linear(width, classes))
        self.net = nn.Sequential(*layers)
        self.recompute = recompute

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.recompute and self.training and torch.is_grad_enabled()):
            return self.net(x)
        start = 0
        for end in self.cuts:
            block = self.net[start:end]
            x = recomputed(block, x, block)
            start = end
        return self.net[start:](x)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = nn.Identity() if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.short(x))


class ResNet(nn.Module):
    """Stem conv, then stages of basic blocks (stride 2 from the second stage), global pool, linear."""

    def __init__(self, in_channels: int, channels: list[int], blocks: int, classes: int,
                 recompute: bool = False) -> None:
        super().__init__()
        self.recompute = recompute
        self.stem = nn.Sequential(nn.Conv2d(in_channels, channels[0], 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(channels[0]), nn.ReLU())
        stages, cin = [], channels[0]
        for i, cout in enumerate(channels):
            for b in range(blocks):
                stages.append(BasicBlock(cin, cout, 2 if (i > 0 and b == 0) else 1))
                cin = cout
        self.stages = nn.Sequential(*stages)
        self.head = nn.Linear(cin, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.recompute and self.training and torch.is_grad_enabled():
            for block in [self.stem, *self.stages]:
                x = recomputed(block, x, block)
        else:
            x = self.stages(self.stem(x))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def build_model(cfg: ModelConfig, input_shape: tuple[int, ...], classes: int) -> nn.Module:
    """Same config, shape and torch seed on every rank give the same initial weights."""
    if cfg.name == "mlp":
        return MLP(math.prod(input_shape), list(cfg.hidden), classes, cfg.dropout, cfg.recompute)
    if len(input_shape) != 3:
        from .config import ConfigError
        raise ConfigError(f"model.name: resnet needs (C,H,W) inputs, the data has shape {input_shape}")
    return ResNet(input_shape[0], list(cfg.channels), cfg.blocks_per_stage, classes, cfg.recompute)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
