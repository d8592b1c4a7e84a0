"""Cutting a model into pipeline stages of consecutive blocks.

A model can be cut when it says what its blocks are (``pipeline_blocks()``: the built-in
models) or is an ``nn.Sequential``. The cut is balanced by parameter count (the largest stage
as small as it can be), or follows ``parallel.cuts``: the names of the blocks where stages
1..P-1 begin. A stage keeps its blocks under the whole model's names, so every stage's state
merges into one state dict that the uncut model loads.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from ..config import ConfigError

Block = tuple[str, nn.Module]


def blocks_of(model: nn.Module) -> list[Block]:
    if hasattr(model, "pipeline_blocks"):
        return list(model.pipeline_blocks())
    if isinstance(model, nn.Sequential):
        return list(model.named_children())
    raise ConfigError("parallel.pipeline_stages: the model can be cut only when it is an nn.Sequential "
                      f"or has pipeline_blocks(); {type(model).__name__} has neither")


def balanced_bounds(weights: Sequence[int], stages: int) -> list[int]:
    """Start index of each stage (the first is 0) so that the heaviest stage is as light as it
    can be; among equal cuts, the earliest. Every stage holds some weight (a stage without
    parameters would have nothing to optimise)."""
    n = len(weights)
    if sum(1 for w in weights if w > 0) < stages:
        raise ConfigError(f"parallel.pipeline_stages: {stages} stages need at least {stages} blocks with "
                          f"parameters, the model has {sum(1 for w in weights if w > 0)}")
    prefix = [0]
    for w in weights:
        prefix.append(prefix[-1] + w)
    inf = float("inf")
    # best[p][i]: the lightest heaviest stage when blocks[:i] are cut into p stages
    best = [[inf] * (n + 1) for _ in range(stages + 1)]
    start = [[0] * (n + 1) for _ in range(stages + 1)]
    best[0][0] = 0
    for p in range(1, stages + 1):
        for i in range(p, n + 1):
            for j in range(p - 1, i):
                weight = prefix[i] - prefix[j]
                cost = max(best[p - 1][j], weight) if weight > 0 else inf
                if cost < best[p][i]:
                    best[p][i], start[p][i] = cost, j
    bounds, i = [], n
    for p in range(stages, 0, -1):
        i = start[p][i]
        bounds.append(i)
    return bounds[::-1]


def named_bounds(names: Sequence[str], cuts: Sequence[str], stages: int) -> list[int]:
    if len(cuts) != stages - 1:
        raise ConfigError(f"parallel.cuts: {stages} stages need {stages - 1} cut points, got {len(cuts)}")
    index = {name: i for i, name in enumerate(names)}
    missing = [c for c in cuts if c not in index]
    if missing:
        raise ConfigError(f"parallel.cuts: no block named {missing[0]!r}; the blocks are {', '.join(names)}")
    bounds = [0] + [index[c] for c in cuts]
    if any(b >= a for a, b in zip(bounds[1:], bounds)):
        raise ConfigError(f"parallel.cuts: {list(cuts)} must name blocks in order, after the first")
    return bounds


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


class Stage(nn.Module):
    """One stage: its blocks in order. Its own ``state_dict`` keys are local; ``whole_names``
    and ``own_part`` translate to and from the whole model's names."""

    def __init__(self, blocks: list[Block], index: int, count: int, whole_shapes: dict[str, list[int]],
                 recompute: bool = False) -> None:
        super().__init__()
        self.index, self.count, self.recompute = index, count, recompute
        self.names = [name for name, _ in blocks]
        self.blocks = nn.ModuleList(m for _, m in blocks)
        self.whole_shapes = whole_shapes  # the uncut model's, the same on every stage

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from ..models import recomputed

        for block in self.blocks:
            if self.recompute and self.training and torch.is_grad_enabled():
                x = recomputed(block, x, block)
            else:
                x = block(x)
        return x

    def whole_names(self, local: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {}
        for key, value in local.items():
            _, i, rest = key.split(".", 2)  # "blocks.<i>.<rest>"
            out[f"{self.names[int(i)]}.{rest}"] = value
        return out

    def own_part(self, whole: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """This stage's entries of a whole-model state dict, under local names."""
        out = {}
        for i, name in enumerate(self.names):
            prefix = f"{name}."
            out.update({f"blocks.{i}.{k[len(prefix):]}": v for k, v in whole.items() if k.startswith(prefix)})
        return out


def cut(model: nn.Module, index: int, count: int, cuts: Optional[Sequence[str]] = None,
        recompute: bool = False) -> Stage:
    """Stage ``index`` of ``count``; the other blocks are dropped (with the model)."""
    blocks = blocks_of(model)
    whole_shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    names = [name for name, _ in blocks]
    bounds = (named_bounds(names, cuts, count) if cuts
              else balanced_bounds([parameter_count(m) for _, m in blocks], count))
    ends = bounds[1:] + [len(blocks)]
    empty = [s for s in range(count) if not sum(parameter_count(m) for _, m in blocks[bounds[s]:ends[s]])]
    if empty:
        raise ConfigError(f"parallel.cuts: stage {empty[0]} would hold no parameters")
    return Stage(blocks[bounds[index]:ends[index]], index, count, whole_shapes, recompute)


def model_shapes(model: nn.Module) -> dict[str, list[int]]:
    """The whole model's parameter and buffer shapes, also from one stage of it."""
    return getattr(model, "whole_shapes", None) or {k: list(v.shape) for k, v in model.state_dict().items()}
