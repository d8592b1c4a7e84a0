"""Built-in models: an MLP, a small ResNet-style CNN and a GPT-style causal transformer. A user
may pass any nn.Module instead.

Each lists its consecutive blocks (``pipeline_blocks()``): applied in order they are the model's
forward pass, and every parameter and buffer belongs to exactly one of them, so a pipeline can cut
the model between any two and save each stage's state under the model's own names.

All can recompute activations (``model.recompute``): the forward pass keeps only each block's
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

from .config import ConfigError, ModelConfig


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

    def pipeline_blocks(self) -> list[tuple[str, nn.Module]]:
        return [(f"net.{i}", m) for i, m in enumerate(self.net)]


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


class PoolLinear(nn.Linear):
    """Global average pool, flatten, linear: the ResNet head as one block. A subclass of
    ``nn.Linear`` so its parameters keep the names ``weight``/``bias`` of older checkpoints."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


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
        self.head = PoolLinear(cin, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.recompute and self.training and torch.is_grad_enabled():
            for block in [self.stem, *self.stages]:
                x = recomputed(block, x, block)
        else:
            x = self.stages(self.stem(x))
        return self.head(x)

    def pipeline_blocks(self) -> list[tuple[str, nn.Module]]:
        return [("stem", self.stem), *((f"stages.{i}", b) for i, b in enumerate(self.stages)),
                ("head", self.head)]


class Embedding(nn.Module):
    """Token plus learned position embedding of (B, T) byte ids, then dropout."""

    def __init__(self, vocab: int, seq_len: int, width: int, dropout: float) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab, width)
        self.positions = nn.Embedding(seq_len, width)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(x.shape[1], device=x.device)
        return self.drop(self.tokens(x) + self.positions(pos))


class CausalSelfAttention(nn.Module):
    def __init__(self, width: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2)
                   for z in self.qkv(x).split(c, dim=2))
        y = nn.functional.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        return self.drop(self.proj(y.transpose(1, 2).reshape(b, t, c)))


class TransformerBlock(nn.Module):
    """Pre-LayerNorm: x + attention(ln(x)), then x + mlp(ln(x)) with a 4x wide GELU MLP."""

    def __init__(self, width: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(width)
        self.attn = CausalSelfAttention(width, heads, dropout)
        self.ln2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width),
                                 nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class LMHead(nn.Module):
    """Final LayerNorm and the vocabulary projection, class dimension second: (B, V, T), the
    layout ``cross_entropy`` and ``argmax(1)`` take with (B, T) targets."""

    def __init__(self, width: int, vocab: int) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(width)
        self.out = nn.Linear(width, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.ln(x)).transpose(1, 2)


class Transformer(nn.Module):
    """A decoder-only causal language model over (B, T) token ids, T <= ``seq_len``. The head
    is not tied to the token embedding: the two may sit on different pipeline stages."""

    def __init__(self, vocab: int, seq_len: int, width: int, layers: int, heads: int,
                 dropout: float = 0.0, recompute: bool = False) -> None:
        super().__init__()
        self.recompute = recompute
        self.embed = Embedding(vocab, seq_len, width, dropout)
        self.blocks = nn.Sequential(*(TransformerBlock(width, heads, dropout) for _ in range(layers)))
        self.head = LMHead(width, vocab)
        self.apply(self._init)
        for block in self.blocks:  # GPT-2: residual branches scaled down with depth
            for proj in (block.attn.proj, block.mlp[2]):
                nn.init.normal_(proj.weight, std=0.02 / math.sqrt(2 * layers))

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        if self.recompute and self.training and torch.is_grad_enabled():
            for block in self.blocks:
                x = recomputed(block, x, block)
        else:
            x = self.blocks(x)
        return self.head(x)

    def pipeline_blocks(self) -> list[tuple[str, nn.Module]]:
        return [("embed", self.embed), *((f"blocks.{i}", b) for i, b in enumerate(self.blocks)),
                ("head", self.head)]


def build_model(cfg: ModelConfig, input_shape: tuple[int, ...], classes: int) -> nn.Module:
    """Same config, shape and torch seed on every rank give the same initial weights."""
    if cfg.name == "mlp":
        return MLP(math.prod(input_shape), list(cfg.hidden), classes, cfg.dropout, cfg.recompute)
    if cfg.name == "transformer":
        if len(input_shape) != 1:
            raise ConfigError(f"model.name: transformer needs token sequences (T,) such as data.name=text's, "
                              f"the data has shape {input_shape}")
        return Transformer(classes, input_shape[0], cfg.width, cfg.layers, cfg.heads, cfg.dropout, cfg.recompute)
    if len(input_shape) != 3:
        raise ConfigError(f"model.name: resnet needs (C,H,W) inputs, the data has shape {input_shape}")
    return ResNet(input_shape[0], list(cfg.channels), cfg.blocks_per_stage, classes, cfg.recompute)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
