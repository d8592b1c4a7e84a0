"""The one interface every gradient-exchange strategy implements.

The training loop talks only to this interface, so Horovod ring-allreduce, torch DDP and the
mpi4py parameter server run under the same loop, metrics and checkpoints. Names follow
Horovod's grid where it has one (``allreduce``, ``allgather_object``, ``broadcast_object``,
``broadcast_parameters``, ``broadcast_optimizer_state``; ``rank``/``size``/``local_rank``/
``local_size``).

Who calls what: ``init``, ``check``, ``role`` and ``shutdown`` are called by every rank of the
job. A rank whose ``role()`` returns a duty (a parameter server) runs it and nothing else; the
other ranks are the *training ranks* and call the rest. Every method marked *collective* must be
called by all training ranks, in the same order, with tensors of the same shape and dtype, or
the job deadlocks.
"""
from __future__ import annotations

import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, Optional, Protocol, Sequence

import torch
from torch import nn

from ..config import ConfigError, TrainConfig
from ..execution import LocalExecutor, LossFn, StepExecutor
from ..monitor.phases import StepPhases
from ..parallel.layout import Layout
from ..precision import Precision


@dataclass(frozen=True)
class StepPlan:
    """How training is cut into steps, as the loop computed it (the same on every rank)."""

    accumulation_steps: int  # micro-batches per optimizer step
    steps_per_epoch: int     # optimizer steps per epoch
    epochs: int


class Trainable(Protocol):
    """What a strategy's :meth:`Strategy.run` drives (the Trainer)."""

    @property
    def step(self) -> int: ...
    def restore(self, collective: bool = True) -> None: ...
    def loop(self) -> dict[str, Any]: ...
    def resize(self) -> None: ...
    def snapshot(self) -> dict[str, Any]: ...
    def load_snapshot(self, snap: dict[str, Any]) -> None: ...


REPLICATED = ("horovod", "ddp", "single")  # every rank holds the whole model and optimizer


class Strategy(ABC):
    """``Strategy(cfg, precision, executor)``; ``init()`` sets ``rank``/``size``/``local_rank``/
    ``local_size``. ``precision`` is what every step runs under; ``executor`` runs the local part
    of a step (forward and backward), the strategy the exchange of gradients."""

    name: str = "base"
    pipelines: bool = False  # whether the replicas of a pipeline stage can exchange through it
    # whether every training rank reaches the same non-finite verdict at the same step (it is
    # taken on what all hold alike); then a NaN can end one run without ending the job
    agreed_nonfinite: bool = True
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1
    device: torch.device = torch.device("cpu")

    def __init__(self, cfg: TrainConfig, precision: Optional[Precision] = None,
                 executor: Optional[StepExecutor] = None) -> None:
        self.cfg = cfg
        self.precision = precision or Precision()
        self.executor = executor or LocalExecutor()
        # train_step marks where its time went (compute, exchange, optimizer); the loop opens
        # and closes each step and charges the data wait and the rest
        self.phases = StepPhases()
        self.bytes_sent = 0  # this rank's estimated traffic in the gradient/parameter exchange

    # --- lifecycle (every rank) --------------------------------------------------------------------
    @abstractmethod
    def init(self) -> None:
        """Start communication; learn rank, size, local_rank, local_size."""

    @classmethod
    def check(cls, cfg: TrainConfig, world_size: int) -> None:
        """Raise :class:`ConfigError` for a config this strategy cannot run on ``world_size``
        ranks. Pure: every rank reaches the same verdict before any collective of training."""

    def role(self) -> Optional[Callable[[], None]]:
        """This rank's duty when it is not a training rank (a parameter server), else None.
        Every rank calls it once, after ``check``."""
        return None

    def start(self) -> None:
        """Training ranks, once, after they agree on the initial (or resumed) state and before
        the first step: where ranks with another duty are told to begin (collective)."""

    def shutdown(self, reason: Optional[str] = None) -> None:
        """Tear communication down (every rank, once). ``reason``: why training did not run (a
        config error every training rank raised), for ranks that wait on the training ranks."""

    # --- driving the loop (training ranks) ------------------------------------------------------------
    def run(self, trainer: Trainable) -> dict[str, Any]:
        """Resume (collective), start, and run the training loop; returns the summary. Horovod
        elastic wraps the loop so that it survives ranks leaving and joining."""
        trainer.restore()
        self.start()
        return trainer.loop()

    def step_done(self, step: int, epoch_end: bool = False) -> None:
        """Every training rank, after each optimizer step and at each epoch end (collective where
        a strategy makes it one: Horovod elastic commits its in-memory state here)."""

    # --- data-parallel view ------------------------------------------------------------------------
    @property
    def layout(self) -> Layout:
        """Which rank holds which pipeline stage of which replica (one stage: every rank a replica)."""
        return Layout(self.size, self.cfg.parallel.pipeline_stages if self.pipelines else 1)

    @property
    def dp_rank(self) -> int:
        """Index of this rank's replica (the data it trains on) among the data-parallel replicas."""
        return self.layout.replica_of(self.rank)

    @property
    def dp_size(self) -> int:
        """Number of data-parallel replicas."""
        return self.layout.replicas

    @property
    def train_size(self) -> int:
        """Number of training ranks: replicas times pipeline stages. The training ranks are
        ranks 0..train_size-1, and object collectives return theirs in that order."""
        return self.dp_size * self.layout.stages

    def training_batches(self, train: Any, cfg: TrainConfig) -> Optional[Any]:
        """This rank's training batches when the strategy deals the data itself (FedAvg's
        clients), else None: the loop's shard of ``train``. The batches' interface is
        :class:`~hvd_trainer.data.sharding.ShardedBatches`'s; every training rank must get the
        same number per epoch."""
        return None

    @property
    def lr_ranks(self) -> int:
        """The rank count the lr scaling rule applies to (the ranks averaged into one step)."""
        return self.dp_size

    # --- model and step (training ranks) -------------------------------------------------------------
    @abstractmethod
    def prepare(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                plan: StepPlan) -> tuple[nn.Module, torch.optim.Optimizer]:
        """Wrap the model/optimizer for this strategy (once, before training)."""

    def sync_batchnorm(self, model: nn.Module) -> nn.Module:
        """The model with BatchNorm layers that normalize over all training ranks' batches."""
        raise ConfigError(f"model.sync_batchnorm: not supported by strategy {self.name}")

    @abstractmethod
    def train_step(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                   micro_batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
                   loss_fn: LossFn, grad_clip: float) -> torch.Tensor:
        """One optimizer step over ``micro_batches`` (collective): the executor's forward and
        backward, then this strategy's exchange and update. Returns the local mean loss."""

    # --- state (collective) ----------------------------------------------------------------------------
    @abstractmethod
    def broadcast_parameters(self, model: nn.Module, root_rank: int = 0) -> None:
        """Make parameters and buffers equal to ``root_rank``'s."""

    @abstractmethod
    def broadcast_optimizer_state(self, optimizer: torch.optim.Optimizer, root_rank: int = 0) -> None:
        """Make the optimizer state equal to ``root_rank``'s (a fresh optimizer has none: no-op)."""

    @abstractmethod
    def broadcast_buffers(self, model: nn.Module, root_rank: int = 0) -> None:
        """Copy ``root_rank``'s buffers (BatchNorm statistics) to every training rank."""

    def checkpoint_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """The ``model`` and ``optimizer`` entries of a checkpoint (collective): the whole model,
        also when this rank holds one pipeline stage of it."""
        return self.executor.checkpoint_parts(unwrap(model), optimizer.state_dict())

    def load_checkpoint_state(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                              payload: dict[str, Any]) -> Optional[str]:
        """Load what :meth:`checkpoint_state` wrote (every training rank, the same payload).
        Raises :class:`ConfigError` when it does not fit this run's model or strategy. Returns a
        note for the user when part of the strategy's own state could not be restored exactly."""
        try:
            model_state, optimizer_state = self.executor.own_state(unwrap(model), payload)
            unwrap(model).load_state_dict(model_state)
            optimizer.load_state_dict(optimizer_state)
        except (RuntimeError, ValueError, KeyError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ConfigError(f"checkpoint: written for another model or optimizer ({first})") from None
        return None

    def check_checkpoint(self, strategy: str, world_size: int) -> int:
        """A checkpoint written by ``strategy`` on ``world_size`` ranks: raise ConfigError when
        this strategy cannot resume it; else the training ranks that wrote it. Checkpoints of
        the strategies that keep a whole optimizer on every rank are interchangeable."""
        if strategy not in REPLICATED:
            raise ConfigError(f"checkpoint: written by strategy={strategy}, this run is "
                              f"strategy={self.name}: set checkpoint.resume=never or another run_dir")
        return world_size

    # --- small collectives (training ranks) ------------------------------------------------------------
    @abstractmethod
    def allreduce(self, tensor: torch.Tensor, op: str = "average") -> torch.Tensor:
        """``op`` ("average", Horovod's default, or "sum") of ``tensor`` over the training
        ranks; a new tensor."""

    @abstractmethod
    def allgather_object(self, obj: Any) -> list[Any]:
        """Every training rank's ``obj`` (picklable, small), in training-rank order."""

    @abstractmethod
    def broadcast_object(self, obj: Any, root_rank: int = 0) -> Any:
        """``root_rank``'s ``obj`` (picklable) on every training rank; the others pass anything."""

    def barrier(self) -> None:
        """Return once every training rank has called it."""
        self.allreduce(torch.zeros(1), op="sum")

    # --- reporting ---------------------------------------------------------------------------------------
    def settings(self) -> dict[str, Any]:
        """Effective communication settings, recorded in summary.json."""
        return {}

    def counters(self) -> dict[str, Any]:
        """Extra counters for summary.json (collective, after the last step)."""
        return {}


def per_rank_checkpoint(name: str, size: int, written_by: str, world_size: int, why: str) -> int:
    """:meth:`Strategy.check_checkpoint` for a strategy whose checkpoints hold every rank's own
    state (``why`` it cannot be re-dealt): its own on the same ranks, or a replicated one."""
    if written_by == name and world_size != size:
        raise ConfigError(f"checkpoint: written by strategy={name} on {world_size} ranks, this run has "
                          f"{size}: {why}; resume on {world_size}")
    if written_by != name and written_by not in REPLICATED:
        raise ConfigError(f"checkpoint: written by strategy={written_by}, this run is strategy={name}: "
                          f"set checkpoint.resume=never or another run_dir")
    return world_size


class NonFiniteGradient(RuntimeError):
    """Raised by ``train_step`` when the gradient it would apply holds NaN or infinity; the
    update was not applied. Horovod and DDP check the averaged gradient, which is the same on
    every rank, so every rank raises it at the same step."""


def checked_update(model: nn.Module, optimizer: torch.optim.Optimizer, grad_clip: float,
                   precision: Optional[Precision] = None, norm_of: Optional[Callable] = None) -> None:
    """Clip (if asked) and step on gradients every rank holds alike, unless they are not finite.
    One read of the gradients (the norm); clipping computes it anyway. With fp16's scaler the
    gradients are unscaled first, and an overflow skips the step (every rank alike) instead of
    raising: lowering the scale is the scaler's normal business.
    ``norm_of(grads)``: the norm of the whole model's gradient (a pipeline stage holds a part)."""
    if precision is not None:
        precision.unscale_(optimizer)
    params = [p for p in model.parameters() if p.grad is not None]
    grads = [p.grad for p in params]
    if norm_of is None:
        norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
    else:
        norm = norm_of(grads)
    if grad_clip > 0 and params:
        torch.nn.utils.clip_grads_with_norm_(params, grad_clip, norm)
    finite = bool(torch.isfinite(norm))
    if precision is not None and precision.handles_overflow:  # fp16 on CUDA: not exercised here
        precision.step(optimizer, finite)
        return
    if not finite:
        optimizer.zero_grad()
        raise NonFiniteGradient(f"gradient norm {float(norm)}")
    optimizer.step()


def ring_bytes(tensors: Sequence[torch.Tensor], ranks: int, scale: float = 1.0) -> int:
    """What one rank sends in a ring allreduce of ``tensors`` over ``ranks``: 2 (N-1)/N of their
    bytes (``scale``: fp16 compression's 0.5). The bandwidth-optimal lower bound; fusion and
    the algorithm MPI picks for small messages differ from it by little."""
    if ranks <= 1:
        return 0
    return int(2 * (ranks - 1) / ranks * scale * sum(t.numel() * t.element_size() for t in tensors))


def unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)


def average_op(op: str) -> bool:
    """Whether ``op`` names the average (else the sum); anything else is a programming error."""
    if op not in ("sum", "average"):
        raise ValueError(f"op must be 'sum' or 'average', got {op!r}")
    return op == "average"


def threads_per_rank(requested: int, local_size: int) -> int:
    """``runtime.threads``, else ``HVD_TRAINER_THREADS`` where ``hvd-launch`` set it (testbed
    hosts that share one machine's cores), else this host's usable cores shared among its ranks."""
    from ..runtime.launch_env import usable_cores
    if requested > 0:
        return requested
    if os.environ.get("HVD_TRAINER_THREADS", "").isdigit() and int(os.environ["HVD_TRAINER_THREADS"]) > 0:
        return int(os.environ["HVD_TRAINER_THREADS"])
    return max(1, usable_cores() // max(1, local_size))
