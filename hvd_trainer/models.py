"""Built-in models: an MLP and a small ResNet-style CNN. A user may pass any nn.Module instead."""
from __future__ import annotations

import math

import torch
from torch import nn

from .config import ModelConfig


class MLP(nn.Module):
    def __init__(self, in_features: int, hidden: list[int], classes: int, dropout: float = 0.0) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            if dropout:
                layers.append(nn.Dropout(dropout))
            width = h
        layers.append(nn.Linear(width, classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


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

    def __init__(self, in_channels: int, channels: list[int], blocks: int, classes: int) -> None:
        super().__init__()
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
        x = self.stages(self.stem(x))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def build_model(cfg: ModelConfig, input_shape: tuple[int, ...], classes: int) -> nn.Module:
    """Same config, shape and torch seed on every rank give the same initial weights."""
    if cfg.name == "mlp":
        return MLP(math.prod(input_shape), list(cfg.hidden), classes, cfg.dropout)
    if len(input_shape) != 3:
        from .config import ConfigError
        raise ConfigError(f"model.name: resnet needs (C,H,W) inputs, the data has shape {input_shape}")
    return ResNet(input_shape[0], list(cfg.channels), cfg.blocks_per_stage, classes)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
