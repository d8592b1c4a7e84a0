"""How one optimizer step is *executed* on a rank, apart from how gradients are *exchanged*.

A strategy owns the exchange (allreduce, a parameter server, DDP's buckets); it asks its
executor for the local part of a step: forward and backward over the micro-batches, leaving
gradients in the parameters. The executor here runs the whole model on this rank;
:class:`~hvd_trainer.parallel.executor.PipelineExecutor` runs one stage of it, with the other
stages on other ranks and microbatches in flight between them. Both also say what a step's
gradient norm is, how the model is evaluated, and what a checkpoint holds of it.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Optional, Protocol, Sequence

import torch
from torch import nn

from .checkpoint import stages_written
from .config import ConfigError
from .precision import Precision

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Batch = tuple[torch.Tensor, torch.Tensor]


class StepExecutor(Protocol):
    def stage_of(self, model: nn.Module) -> nn.Module: ...
    def backward_passes(self, accumulation_steps: int) -> int: ...
    def forward_backward(self, model: nn.Module, micro_batches: Sequence[Batch], loss_fn: LossFn,
                         precision: Precision,
                         before_backward: Callable[[int], Any] = ...) -> torch.Tensor: ...
    def grad_norm(self, grads: list[torch.Tensor]) -> torch.Tensor: ...
    def infer(self, model: nn.Module, x: torch.Tensor, precision: Precision) -> Optional[torch.Tensor]: ...
    def checkpoint_parts(self, model: nn.Module, optimizer_state: dict[str, Any]) -> dict[str, Any]: ...
    def own_state(self, model: nn.Module, payload: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]: ...
    def describe(self) -> list[str]: ...
    def close(self) -> None: ...


class LocalExecutor:
    """The whole model on this rank; k micro-batches accumulate into one step's gradient."""

    def stage_of(self, model: nn.Module) -> nn.Module:
        return model

    def backward_passes(self, accumulation_steps: int) -> int:
        return accumulation_steps

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

    def grad_norm(self, grads: list[torch.Tensor]) -> torch.Tensor:
        return torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())

    def infer(self, model: nn.Module, x: torch.Tensor, precision: Precision) -> Optional[torch.Tensor]:
        with precision.autocast():
            return model(x)

    def checkpoint_parts(self, model: nn.Module, optimizer_state: dict[str, Any]) -> dict[str, Any]:
        return {"model": model.state_dict(), "optimizer": optimizer_state}

    def own_state(self, model: nn.Module, payload: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        if stages_written(payload) != 1:
            raise ConfigError(f"checkpoint: written with parallel.pipeline_stages={stages_written(payload)}, "
                              f"this run has 1: resume with the same stages, or set checkpoint.resume=never "
                              f"(hvd_trainer.checkpoint.whole_model(path) reads its whole model)")
        return payload["model"], payload["optimizer"]

    def describe(self) -> list[str]:
        return []

    def close(self) -> None:
        pass
