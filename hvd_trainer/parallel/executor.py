"""Running a step over pipeline stages: activations forward, their gradients backward, over
mpi4py point-to-point messages between the consecutive ranks of one replica's pipeline.

Why MPI and not ``torch.distributed.pipelining``: every rank here already runs MPI (Horovod,
the control plane), so a pipeline needs no second rendezvous, works wherever the job's MPI
does (the testbed's hosts too), and a rank stopped or killed mid-send is found by the control
plane's heartbeat like any other lost rank. Users of the library report hangs on gloo for some
schedules (pytorch#132644) and at stage construction across nodes (torchtitan#1492). The
schedules are plain rules (:mod:`.schedule`); sends are non-blocking and receives blocking,
which cannot deadlock because every schedule's waits form a chain that ends at a rank that
is computing.

Each loop micro-batch is split into ``parallel.microbatches`` pieces; piece i's loss is weighted
by its share of the step's samples, so the gradient is the whole batch's, as on one rank.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from ..checkpoint import stages_written
from ..config import ConfigError
from ..execution import Batch, LocalExecutor, LossFn
from ..precision import Precision
from .layout import Layout
from .schedule import actions
from .stages import Stage, cut


class PipelineExecutor:
    """The stage this rank holds of its replica's pipeline (one MPI communicator per pipeline)."""

    def __init__(self, layout: Layout, rank: int, schedule: str, microbatches: int,
                 cuts: Optional[Sequence[str]] = None, recompute: bool = False) -> None:
        from mpi4py import MPI

        self.MPI, self.layout = MPI, layout
        self.stage, self.replica = layout.stage_of(rank), layout.replica_of(rank)
        self.stages = layout.stages
        self.schedule, self.microbatches = schedule, microbatches
        self.cuts, self.recompute = cuts, recompute
        # collective over COMM_WORLD: every rank builds its pipeline's communicator, ranked by stage
        self.comm = MPI.COMM_WORLD.Split(color=self.replica, key=self.stage)
        self.first, self.last = self.stage == 0, self.stage == self.stages - 1

    # --- the model -------------------------------------------------------------------------------
    def stage_of(self, model: nn.Module) -> nn.Module:
        return cut(model, self.stage, self.stages, self.cuts, self.recompute)

    def backward_passes(self, accumulation_steps: int) -> int:
        """Backward passes per optimizer step, for an exchange that counts them (Horovod)."""
        return accumulation_steps * self.microbatches

    # --- a training step -------------------------------------------------------------------------
    def forward_backward(self, model: nn.Module, micro_batches: Sequence[Batch], loss_fn: LossFn,
                         precision: Optional[Precision] = None,
                         before_backward: Callable[[int], Any] = lambda i: None) -> torch.Tensor:
        """The step's forward and backward on this stage; the loss (the last stage's, sent to
        the others) is returned on every stage."""
        precision = precision or Precision()
        pieces = [(x, y) for xb, yb in micro_batches
                  for x, y in zip(xb.tensor_split(self.microbatches), yb.tensor_split(self.microbatches))]
        total_n = sum(len(y) for _, y in pieces)
        n = len(pieces)
        kept: dict[int, tuple[Optional[torch.Tensor], torch.Tensor]] = {}
        sends: list = []
        total = torch.zeros(())
        for kind, i in actions(self.schedule, self.stage, self.stages, n):
            with before_backward(i) or contextlib.nullcontext():
                if kind == "F":
                    inp = pieces[i][0] if self.first else self._receive(i)
                    with precision.autocast():
                        out = model(inp)
                        if self.last:
                            y = pieces[i][1]
                            out = (loss_fn(out, y).float() * (len(y) / total_n) if len(y)
                                   else out.float().sum() * 0.0)
                            total += out.detach()
                    if not self.last:
                        sends.append(self._send(out.detach(), self.stage + 1, i))
                    kept[i] = (None if self.first else inp, out)
                else:
                    inp, out = kept.pop(i)
                    if self.last:
                        precision.backward(out)
                    else:
                        torch.autograd.backward(out, self._receive(i, grad=True))
                    if not self.first:
                        sends.append(self._send(inp.grad, self.stage - 1, i, grad=True))
        self.MPI.Request.Waitall(sends)
        return torch.tensor(self.comm.bcast(float(total) if self.last else None, root=self.stages - 1))

    def _send(self, tensor: torch.Tensor, stage: int, micro: int, grad: bool = False):
        return self.comm.isend(tensor, dest=stage, tag=2 * micro + int(grad))

    def _receive(self, micro: int, grad: bool = False) -> torch.Tensor:
        source = self.stage + 1 if grad else self.stage - 1
        t = self.comm.recv(source=source, tag=2 * micro + int(grad))
        if not grad and t.is_floating_point():
            t.requires_grad_(True)
        return t

    def grad_norm(self, grads: list[torch.Tensor]) -> torch.Tensor:
        """The norm of the whole model's gradient: every stage's share, summed over the pipeline."""
        local = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
        return torch.tensor(self.comm.allreduce(float(local) ** 2)) ** 0.5

    # --- evaluation ------------------------------------------------------------------------------
    @torch.no_grad()
    def infer(self, model: nn.Module, x: torch.Tensor, precision: Precision) -> Optional[torch.Tensor]:
        """``model(x)`` through the pipeline: the output on the last stage, None on the others."""
        inp = x if self.first else self.comm.recv(source=self.stage - 1, tag=0)
        with precision.autocast():
            out = model(inp)
        if self.last:
            return out
        self.comm.send(out, dest=self.stage + 1, tag=0)
        return None

    # --- checkpoints -----------------------------------------------------------------------------
    def checkpoint_parts(self, model: nn.Module, optimizer_state: dict[str, Any]) -> dict[str, Any]:
        """Collective over the pipeline: the whole model's state dict, which the uncut model
        loads, and every stage's optimizer state (its parameter indices are the stage's own)."""
        stage = _stage(model)
        parts = self.comm.allgather((stage.whole_names(stage.state_dict()), optimizer_state))
        whole: dict[str, Any] = {}
        for part, _ in parts:
            whole.update(part)
        return {"model": whole, "optimizer": {"pipeline_stages": self.stages, "stages": [o for _, o in parts]}}

    def own_state(self, model: nn.Module, payload: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """This stage's model and optimizer state from a checkpoint of :meth:`checkpoint_parts`."""
        written = stages_written(payload)
        if written != self.stages:
            raise ConfigError(f"checkpoint: written with parallel.pipeline_stages={written}, this run has "
                              f"{self.stages}: resume with the same stages, or set checkpoint.resume=never")
        return _stage(model).own_part(payload["model"]), payload["optimizer"]["stages"][self.stage]

    def describe(self) -> list[str]:
        """Collective: the layout, one line per replica (rank 0 prints it)."""
        return self.layout.describe(self.MPI.COMM_WORLD.allgather(self.MPI.Get_processor_name()))

    def close(self) -> None:
        self.comm.Free()


def _stage(model: nn.Module) -> Stage:
    inner = getattr(model, "module", model)
    if not isinstance(inner, Stage):
        raise TypeError(f"expected a pipeline stage, got {type(inner).__name__}")
    return inner


def check_pipeline(cfg, world_size: int, pipelines: bool) -> None:
    """Pure: what no pipeline layout can run, before any collective."""
    p = cfg.parallel
    if p.pipeline_stages == 1:
        return
    if not pipelines:
        raise ConfigError(f"parallel.pipeline_stages: strategy {cfg.strategy} does not run pipeline stages "
                          f"(use horovod or ddp)")
    if world_size % p.pipeline_stages:
        raise ConfigError(f"parallel.pipeline_stages: {p.pipeline_stages} stages do not divide the "
                          f"{world_size} ranks")
    if cfg.data.name == "shards":  # each rank opens its own files: a stage's replicas would not agree
        raise ConfigError("data.name: shards are not supported with parallel.pipeline_stages > 1")
    if p.microbatches > cfg.batch_size:
        raise ConfigError(f"parallel.microbatches: {p.microbatches} is more than batch_size {cfg.batch_size}")


def make_executor(cfg, strategy):
    """The strategy's executor for this run: the whole model, or this rank's pipeline stage
    (collective over every rank of the job then: the pipelines' communicators are split)."""
    layout = strategy.layout
    if layout.stages == 1:
        return LocalExecutor()
    p = cfg.parallel
    return PipelineExecutor(layout, strategy.rank, p.schedule, p.microbatches, p.cuts, cfg.model.recompute)
