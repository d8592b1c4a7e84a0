"""How one optimizer step is *executed* on a rank, apart from how gradients are *exchanged*.

A strategy owns the exchange (allreduce, a parameter server, DDP's buckets); it asks its
executor for the local part of a step: forward and backward over the micro-batches, leaving
gradients in the parameters. The executor here runs the whole model on this rank; a pipeline
executor (stages on other ranks, microbatches in flight) is meant to plug in at the same seam.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Optional, Protocol, Sequence

import torch
from torch import nn

from .precision import Precision

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Batch = tuple[torch.Tensor, torch.Tensor]


class StepExecutor(Protocol):
    def forward_backward(self, model: nn.Module, micro_batches: Sequence[Batch], loss_fn: LossFn,
                         precision: Precision,
                         before_backward: Callable[[int], Any] = ...) -> torch.Tensor: ...


class LocalExecutor:
    """The whole model on this rank; k micro-batches accumulate into one step's gradient."""

    def forward_backward(self, model: nn.Module, micro_batches: Sequence[Batch], loss_fn: LossFn,
                         precision: Optional[Precision] = None,
                         before_backward: Callable[[int], Any] = lambda i: None) -> torch.Tensor:
        """Each micro-batch's loss is weighted by its share of the samples, so k micro-batches of
        b give the gradient of one batch of k*b even when the last is short. Returns the mean
        loss over the samples, detached.

        ``before_backward(i)`` may return a context manager for micro-batch i (DDP's ``no_sync``).
        ``precision``: forward and loss under its autocast, backward of the (fp16: scaled) loss.
        """
        precision = precision or Precision()
        total_n = sum(len(y) for _, y in micro_batches)
        total = torch.zeros(())
        for i, (x, y) in enumerate(micro_batches):
            with before_backward(i) or contextlib.nullcontext():
                with precision.autocast():
                    out = model(x)
                    # a batch left empty (every sample unreadable, data.bad_samples=skip) still
                    # runs backward, with a zero gradient: the exchange waits for every rank's
                    loss = loss_fn(out, y).float() * (len(y) / total_n) if len(y) else out.float().sum() * 0.0
                precision.backward(loss)
            total += loss.detach()
        return total
