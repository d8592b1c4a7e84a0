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

import numpy as np
import torch
from torch import nn

from ..checkpoint import stages_written
from ..config import ConfigError
from ..execution import Batch, LocalExecutor, LossFn
from ..monitor.phases import StepPhases
from ..precision import Precision
from ..runtime import world as run_world
from .layout import Layout
from .schedule import actions
from .stages import Stage, cut


# what may cross between stages: activations (fp32, bf16 under autocast, fp16), token ids
_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.int32, torch.uint8,
           torch.bool]
_MAX_DIMS = 8


class PipelineExecutor:
    """The stage this rank holds of its replica's pipeline (one MPI communicator per pipeline)."""

    def __init__(self, layout: Layout, rank: int, schedule: str, microbatches: int,
                 cuts: Optional[Sequence[str]] = None, recompute: bool = False,
                 phases: Optional[StepPhases] = None) -> None:
        from mpi4py import MPI

        self.MPI, self.layout = MPI, layout
        self.stage, self.replica = layout.stage_of(rank), layout.replica_of(rank)
        self.stages = layout.stages
        self.schedule, self.microbatches = schedule, microbatches
        self.cuts, self.recompute = cuts, recompute
        # a wait for a neighbouring stage (the bubble, an activation in transit) is charged to
        # "exchange", the rest of the schedule to "compute"
        self.phases = phases or StepPhases()
        # collective over COMM_WORLD: every rank builds its pipeline's communicator, ranked by stage
        self.comm = run_world.comm().Split(color=self.replica, key=self.stage)
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
                        sends += self._send(out, self.stage + 1, i)
                    kept[i] = (None if self.first else inp, out)
                else:
                    inp, out = kept.pop(i)
                    if self.last:
                        precision.backward(out)
                    else:
                        torch.autograd.backward(out, self._receive(i, grad=True))
                    if not self.first:
                        g = inp.grad if inp.grad is not None else torch.zeros_like(inp)
                        sends += self._send(g, self.stage - 1, i, grad=True)
            # a delivered activation is let go now, not at the step's end (1F1B's memory bound)
            sends = [(r, buf) for r, buf in sends if not r.Test()]
        self.phases.lap("compute")
        self.MPI.Request.Waitall([r for r, _ in sends])
        loss = np.array([float(total)])
        self.comm.Bcast(loss, root=self.stages - 1)
        self.phases.lap("exchange")
        return torch.tensor(float(loss[0]))

    def _send(self, tensor: torch.Tensor, stage: int, micro: int, grad: bool = False) -> list:
        """Non-blocking: a header (dtype, shape), then the raw bytes. Buffers, not pickles: a
        pickled tensor costs ~0.2 ms a message here, its bytes a few microseconds."""
        t = tensor.detach().contiguous()
        header = np.zeros(2 + _MAX_DIMS, dtype=np.int64)
        header[0], header[1] = _DTYPES.index(t.dtype), t.dim()
        header[2:2 + t.dim()] = t.shape
        body = t.reshape(-1).view(torch.uint8).numpy()
        tag = 2 * micro + int(grad)
        # the buffers stay referenced with their requests until Waitall
        return [(self.comm.Isend(header, dest=stage, tag=tag), header), (self.comm.Isend(body, dest=stage, tag=tag), t)]

    def _receive(self, micro: int, grad: bool = False) -> torch.Tensor:
        source = self.stage + 1 if grad else self.stage - 1
        self.phases.lap("compute")
        t = self._recv(source, 2 * micro + int(grad))
        self.phases.lap("exchange")
        if not grad and t.is_floating_point():
            t.requires_grad_(True)
        return t

    def _recv(self, source: int, tag: int) -> torch.Tensor:
        header = np.empty(2 + _MAX_DIMS, dtype=np.int64)
        self.comm.Recv(header, source=source, tag=tag)
        shape = [int(d) for d in header[2:2 + int(header[1])]]
        t = torch.empty(shape, dtype=_DTYPES[int(header[0])])
        self.comm.Recv(t.reshape(-1).view(torch.uint8).numpy(), source=source, tag=tag)
        return t

    def grad_norm(self, grads: list[torch.Tensor]) -> torch.Tensor:
        """The norm of the whole model's gradient: every stage's share, summed over the pipeline."""
        local = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
        self.phases.lap("optimizer")
        squares = np.array([float(local) ** 2])
        self.comm.Allreduce(self.MPI.IN_PLACE, squares)
        total = torch.tensor(float(squares[0])) ** 0.5
        self.phases.lap("exchange")  # the wait for the other stages to reach their update
        return total

    # --- evaluation ------------------------------------------------------------------------------
    @torch.no_grad()
    def infer(self, model: nn.Module, x: torch.Tensor, precision: Precision) -> Optional[torch.Tensor]:
        """``model(x)`` through the pipeline: the output on the last stage, None on the others."""
        inp = x if self.first else self._recv(self.stage - 1, 0)
        with precision.autocast():
            out = model(inp)
        if self.last:
            return out
        self.MPI.Request.Waitall([r for r, _ in self._send(out, self.stage + 1, 0)])
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
        return self.layout.describe(run_world.comm().allgather(self.MPI.Get_processor_name()))

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
    return PipelineExecutor(layout, strategy.rank, p.schedule, p.microbatches, p.cuts, cfg.model.recompute,
                            strategy.phases)
