"""The one interface every gradient-exchange strategy implements.

The training loop talks only to this interface, so Horovod ring-allreduce, torch DDP and the
mpi4py parameter server run under the same loop, metrics and checkpoints. Every method is a
collective over the ranks named in its docstring unless it says otherwise: all those ranks must
call it, in the same order, with tensors of the same shape, or the job deadlocks.
"""
from __future__ import annotations

import contextlib
import io
import os
from abc import ABC, abstractmethod
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class Strategy(ABC):
    """Base class. Subclasses set ``rank``/``size``/``local_rank``/``local_size`` in ``init``."""

    name: str = "base"
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1
    device: torch.device = torch.device("cpu")

    # --- lifecycle (all ranks) ------------------------------------------------------------------
    @abstractmethod
    def init(self) -> None:
        """Start communication. Sets rank, size, local_rank, local_size."""

    def shutdown(self) -> None:
        """Tear communication down (all ranks, at the end of a successful run)."""

    def abort(self, code: int = 1) -> None:
        """Bring every rank of the job down after a failure on this rank (any one rank).

        Default: MPI_Abort when launched by an MPI launcher, else exit this process at once
        (Gloo and torch.distributed peers then fail on the closed connection)."""
        if any(v in os.environ for v in ("OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "PMI_RANK")):
            try:
                from mpi4py import MPI  # noqa: PLC0415 - MPI is initialised already (Horovod/PS/DDP)

                if MPI.Is_initialized() and not MPI.Is_finalized():
                    MPI.COMM_WORLD.Abort(code)
            except Exception:
                pass
        os._exit(code)

    # --- data-parallel view -----------------------------------------------------------------------
    @property
    def is_worker(self) -> bool:
        """Whether this rank trains on data (False only for parameter-server ranks)."""
        return True

    @property
    def dp_rank(self) -> int:
        """Index of this rank among the data-parallel (worker) ranks."""
        return self.rank

    @property
    def dp_size(self) -> int:
        """Number of data-parallel (worker) ranks."""
        return self.size

    @property
    def lr_ranks(self) -> int:
        """The rank count the lr scaling rule applies to (the ranks averaged into one step)."""
        return self.dp_size

    def end_training(self) -> None:
        """Called by every rank after the last step, before the summary."""

    def serve(self, trainer: Any) -> None:
        """Run a non-worker rank's duty until the workers finish (parameter servers only)."""
        raise NotImplementedError(f"{self.name}: every rank is a worker")

    # --- model and step (worker ranks) ----------------------------------------------------------------
    @abstractmethod
    def prepare(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                accumulation_steps: int) -> tuple[nn.Module, torch.optim.Optimizer]:
        """Wrap the model/optimizer for this strategy (worker ranks, once, before training)."""

    def sync_batchnorm(self, model: nn.Module) -> nn.Module:
        """The model with BatchNorm layers that normalize over all workers' batches."""
        from ..config import ConfigError
        raise ConfigError(f"model.sync_batchnorm: not supported by strategy {self.name}")

    @abstractmethod
    def train_step(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                   micro_batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
                   loss_fn: LossFn, grad_clip: float) -> torch.Tensor:
        """One optimizer step over ``micro_batches`` (worker ranks). Each micro-batch's loss is
        divided by their number, so k micro-batches of b equal one batch of k*b. Returns the
        local mean loss, detached."""

    @abstractmethod
    def broadcast_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Make parameters, buffers and optimizer state equal to rank 0's (worker ranks)."""

    @abstractmethod
    def sync_buffers(self, model: nn.Module) -> None:
        """Copy rank 0's buffers (BatchNorm statistics) to every worker (worker ranks)."""

    # --- small collectives (worker ranks) ------------------------------------------------------------
    @abstractmethod
    def allreduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum of ``tensor`` over worker ranks (float64 recommended for counters)."""

    @abstractmethod
    def allgather_object(self, obj: Any) -> list[Any]:
        """Every worker's ``obj``, in dp_rank order (small objects only)."""

    @abstractmethod
    def broadcast_bytes(self, data: Optional[bytes]) -> bytes:
        """Rank 0's ``data`` on every worker (others pass None)."""

    # --- checkpoint payload (worker ranks) ------------------------------------------------------------
    def checkpoint_payload(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """Model and optimizer state as they must be saved (a PS gathers them from its servers)."""
        return {"model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict()}

    def load_payload(self, model: nn.Module, optimizer: torch.optim.Optimizer, payload: dict[str, Any]) -> None:
        unwrap(model).load_state_dict(payload["model"])
        optimizer.load_state_dict(payload["optimizer"])

    def settings(self) -> dict[str, Any]:
        """Effective communication settings, recorded in summary.json."""
        return {}

    def counters(self) -> dict[str, Any]:
        """Extra counters for summary.json (collective over worker ranks)."""
        return {}


def unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)


def mean_loss_step(model: nn.Module, micro_batches, loss_fn: LossFn,
                   before_backward: Callable[[int], Any] = lambda i: None) -> torch.Tensor:
    """Forward and backward over the micro-batches, each loss weighted by its share of the
    samples (1/k for equal sizes), so k micro-batches give the gradient of one k*b batch even
    when the last one is short. Returns the mean loss over the samples, detached.

    ``before_backward(i)`` may return a context manager (DDP's ``no_sync``) for micro-batch i.
    """
    total_n = sum(len(y) for _, y in micro_batches)
    total = torch.zeros(())
    for i, (x, y) in enumerate(micro_batches):
        ctx = before_backward(i) or contextlib.nullcontext()
        with ctx:
            loss = loss_fn(model(x), y) * (len(y) / total_n)
            loss.backward()
        total += loss.detach()
    return total


def torch_load_bytes(data: bytes) -> Any:
    """Weights-only load (no arbitrary unpickling) of checkpoint bytes."""
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def threads_per_rank(requested: int, local_size: int) -> int:
    from ..launch_env import usable_cores
    return requested if requested > 0 else max(1, usable_cores() // max(1, local_size))
