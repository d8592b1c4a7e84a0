"""Synchronous BatchNorm that works on CPU.

Horovod's ``hvd.SyncBatchNorm`` and torch's ``nn.SyncBatchNorm`` both refuse CPU tensors. This
one normalizes with the statistics of the global batch by summing (sum, sum of squares, count)
over the workers with a *differentiable* allreduce, so autograd carries the cross-rank terms of
the gradient. With it, N ranks at batch b compute exactly what one rank computes at batch N*b.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

AllreduceSum = Callable[[torch.Tensor], torch.Tensor]


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm over the union of every worker's batch. All workers must run forward and
    backward together (same number of calls, in the same order)."""

    def __init__(self, num_features: int, allreduce_sum: AllreduceSum, eps: float = 1e-5,
                 momentum: float = 0.1, affine: bool = True, track_running_stats: bool = True) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats)
        self._allreduce_sum = allreduce_sum

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2-D input, got {x.dim()}-D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training and self.track_running_stats:
            return super().forward(x)
        c = x.size(1)
        dims = [0] + list(range(2, x.dim()))
        count = x.new_tensor([x.numel() / c])
        stats = self._allreduce_sum(torch.cat([x.sum(dims), (x * x).sum(dims), count]))
        n = stats[2 * c]
        mean = stats[:c] / n
        var = (stats[c:2 * c] / n - mean * mean).clamp_min(0)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(var.detach() * (n / max(n - 1, 1)), alpha=m)
        shape = [1, c] + [1] * (x.dim() - 2)
        y = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y


def convert(module: nn.Module, make: Callable[[nn.modules.batchnorm._BatchNorm], nn.Module]) -> nn.Module:
    """Replace every BatchNorm layer of ``module`` by ``make(layer)``, keeping its state."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        new = make(module)
        new.load_state_dict(module.state_dict())
        return new
    for name, child in module.named_children():
        setattr(module, name, convert(child, make))
    return module


def global_bn(allreduce_sum: AllreduceSum) -> Callable[[nn.modules.batchnorm._BatchNorm], nn.Module]:
    """A ``make`` for :func:`convert` building GlobalBatchNorm layers over ``allreduce_sum``."""
    return lambda bn: GlobalBatchNorm(bn.num_features, allreduce_sum, bn.eps, bn.momentum,
                                      bn.affine, bn.track_running_stats)
