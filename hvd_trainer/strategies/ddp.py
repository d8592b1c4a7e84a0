"""torch DistributedDataParallel over gloo: the baseline a user would otherwise pick.

Ranks come from MPI when launched by mpirun/srun (mpi4py bootstraps the rendezvous: rank 0
picks a port and tells the others) or from torchrun's RANK/WORLD_SIZE/MASTER_ADDR variables.
"""
from __future__ import annotations

import gc
import os
import socket
from datetime import timedelta
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .. import syncbn
from ..config import ConfigError, DDPConfig, TrainConfig
from ..runtime import world as run_world
from .base import NonFiniteGradient, StepPlan, Strategy, average_op, checked_update, threads_per_rank, unwrap
from .ddp_hooks import CommHook

POWERSGD_KEY = "ddp_powersgd"  # in a checkpoint's optimizer entry: every rank's PowerSGD state


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _rendezvous(cfg: DDPConfig) -> tuple[int, int, int, int, str]:
    """(rank, size, local_rank, local_size, init_method) from MPI or torchrun's environment."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ:
        rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        return (rank, size, int(os.environ.get("LOCAL_RANK", 0)),
                int(os.environ.get("LOCAL_WORLD_SIZE", 1)), "env://")
    from mpi4py import MPI

    comm = run_world.comm()
    rank, size = comm.Get_rank(), comm.Get_size()
    local = comm.Split_type(MPI.COMM_TYPE_SHARED)
    hosts = comm.allgather(socket.gethostname())
    if rank == 0:
        # Single host: loopback. Several: rank 0's hostname, which the others must resolve.
        addr = "127.0.0.1" if len(set(hosts)) == 1 else socket.gethostbyname(hosts[0])
        port = cfg.master_port or _free_port(addr)
    else:
        addr, port = None, None
    addr, port = comm.bcast((addr, port), root=0)
    out = (rank, size, local.Get_rank(), local.Get_size(), f"tcp://{addr}:{port}")
    local.Free()
    return out


def _collective_timeout(peer_timeout_s: float) -> timedelta:
    """gloo's own timeout on a collective: the backstop for a lost rank where the control plane
    has no side channel (torchrun); generous, since a peer may be writing a checkpoint."""
    return timedelta(seconds=max(60.0, 4 * peer_timeout_s) if peer_timeout_s > 0 else 1800.0)


class DDPStrategy(Strategy):
    name = "ddp"
    pipelines = True  # the replicas of a stage reduce over a process sub-group

    def __init__(self, cfg: TrainConfig, precision=None, executor=None) -> None:
        super().__init__(cfg, precision, executor)
        self.dcfg = cfg.ddp
        self.group = None  # this rank's stage replicas under pipeline stages (None: the world)
        self.hook = CommHook(self.dcfg)  # prepare() builds the real one, on the group
        self._model_params: list[torch.Tensor] = []
        self._steps = 0  # optimizer steps taken, for the traffic estimate (PowerSGD's warm-up)

    @classmethod
    def check(cls, cfg: TrainConfig, world_size: int) -> None:
        # under pipeline stages the gradients are averaged after the passes, without DDP's hooks
        if cfg.ddp.comm_hook != "none" and cfg.parallel.pipeline_stages > 1:
            raise ConfigError(f"ddp.comm_hook: {cfg.ddp.comm_hook} is not supported with "
                              f"parallel.pipeline_stages > 1: use none")

    def init(self) -> None:
        self.rank, self.size, self.local_rank, self.local_size, method = _rendezvous(self.dcfg)
        if torch.cuda.is_available():  # not exercised here (no GPU)
            torch.cuda.set_device(self.local_rank)
            self.device = torch.device("cuda", self.local_rank)
        dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo", init_method=method, rank=self.rank, world_size=self.size,
                                timeout=_collective_timeout(self.cfg.runtime.peer_timeout_s))
        torch.set_num_threads(threads_per_rank(self.cfg.runtime.threads, self.local_size))
        stages = self.cfg.parallel.pipeline_stages
        if stages > 1 and self.size % stages == 0:  # else check() names it
            layout = self.layout  # every rank creates every stage's group, in the same order
            groups = [dist.new_group(layout.stage_group(s)) for s in range(stages)]
            self.group = groups[layout.stage_of(self.rank)]

    def shutdown(self, reason: Optional[str] = None) -> None:
        # A rank that leaves while a peer still talks to it, or a process group whose last
        # reference (held by the DDP wrapper) dies only at interpreter exit, ends a healthy job
        # with "terminate called without an active exception" (rc 134): gloo's threads are torn
        # down with the interpreter. So: every rank has finished (barrier), the trainer has
        # dropped its DDP wrapper (train() closes it first), the group is destroyed, and what
        # referenced it is collected while the interpreter is whole.
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
        gc.collect()

    def prepare(self, model, optimizer, plan: StepPlan):
        ids = [self.local_rank] if self.device.type == "cuda" else None
        ddp = DistributedDataParallel(model, device_ids=ids, bucket_cap_mb=self.dcfg.bucket_cap_mb,
                                      process_group=self.group)
        self.hook = CommHook(self.dcfg, self.group, self.cfg.seed)
        self.hook.register(ddp)
        self._model_params = list(model.parameters())
        return ddp, optimizer

    def sync_batchnorm(self, model: nn.Module) -> nn.Module:
        if self.device.type == "cuda":
            return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)  # not exercised here (no GPU)
        from torch.distributed.nn.functional import all_reduce  # differentiable
        return syncbn.convert(model, syncbn.global_bn(all_reduce))

    def train_step(self, model, optimizer, micro_batches, loss_fn, grad_clip):
        optimizer.zero_grad()
        self.hook.bucket_ready = None
        if self.group is not None:
            return self._pipelined_step(model, optimizer, micro_batches, loss_fn, grad_clip)
        last = len(micro_batches) - 1
        # Only the last micro-batch's backward allreduces; the others accumulate locally.
        loss = self.executor.forward_backward(model, micro_batches, loss_fn, self.precision,
                                              lambda i: model.no_sync() if i < last else None)
        # backward returns once the buckets' allreduces are done: what followed the last
        # bucket's launch was waiting for the exchange
        self.phases.lap("compute", at=self.hook.bucket_ready)
        self.phases.lap("exchange")
        n = self.dp_size  # a ring sends 2 (N-1)/N of what goes in
        self.bytes_sent += int(2 * (n - 1) / n * self.bytes_per_step(self._steps)) if n > 1 else 0
        self._steps += 1
        # after backward, every rank holds the average (fp16: unscaled, then checked)
        try:
            checked_update(model, optimizer, grad_clip, self.precision, self.executor.grad_norm)
        except NonFiniteGradient:
            self.hook.forget()  # PowerSGD's memory of this step holds NaN: not to be added in later
            raise
        self.phases.lap("optimizer")
        return loss

    def _pipelined_step(self, model, optimizer, micro_batches, loss_fn, grad_clip):
        """Under pipeline stages a stage's passes interleave across microbatches, and DDP's
        reducer expects the backward of the forward it prepared: every pass runs under
        ``no_sync``, and the stage's gradients are then averaged over its replicas at once."""
        loss = self.executor.forward_backward(model, micro_batches, loss_fn, self.precision,
                                              lambda i: model.no_sync())
        self.phases.lap("compute")
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        if grads:
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat, group=self.group)
            flat /= self.dp_size
            offset = 0
            for g in grads:
                g.copy_(flat[offset:offset + g.numel()].view_as(g))
                offset += g.numel()
        self.phases.lap("exchange")
        checked_update(model, optimizer, grad_clip, self.precision, self.executor.grad_norm)
        self.phases.lap("optimizer")
        return loss

    # With pipeline stages, ``root_rank`` is a replica: each stage takes its own replica's
    # copy, within the stage's group (torch's src is a global rank)
    def _stage_root(self, root_rank: int) -> int:
        return self.layout.rank_of(root_rank, self.layout.stage_of(self.rank))

    def broadcast_parameters(self, model, root_rank: int = 0) -> None:
        module = unwrap(model)
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, src=self._stage_root(root_rank), group=self.group)

    def broadcast_optimizer_state(self, optimizer, root_rank: int = 0) -> None:
        if optimizer.state_dict()["state"]:  # every rank agrees (see HorovodStrategy)
            box = [optimizer.state_dict()]
            dist.broadcast_object_list(box, src=self._stage_root(root_rank), group=self.group)
            optimizer.load_state_dict(box[0])

    def broadcast_buffers(self, model: nn.Module, root_rank: int = 0) -> None:
        for b in unwrap(model).buffers():
            dist.broadcast(b.data, src=self._stage_root(root_rank), group=self.group)

    def checkpoint_state(self, model, optimizer) -> dict[str, Any]:
        """With PowerSGD, the optimizer entry also holds every rank's PowerSGD state (each rank's
        error feedback is its own), in rank order; other strategies ignore it."""
        parts = super().checkpoint_state(model, optimizer)
        if self.hook.powersgd is not None:
            parts["optimizer"] = {**parts["optimizer"], POWERSGD_KEY: self.allgather_object(self.hook.state_dict())}
        return parts

    def load_checkpoint_state(self, model, optimizer, payload) -> Optional[str]:
        opt = payload["optimizer"]
        states = opt.get(POWERSGD_KEY) if isinstance(opt, dict) else None
        if states is not None:
            payload = {**payload, "optimizer": {k: v for k, v in opt.items() if k != POWERSGD_KEY}}
        super().load_checkpoint_state(model, optimizer, payload)
        self._steps = int(payload["step"])
        if states is not None and len(states) != self.size:
            states = None  # another world size: no rank's error feedback is this rank's
        return self.hook.load_state_dict(states[self.rank] if states else None)

    def bytes_per_step(self, step: Optional[int] = None) -> int:
        """Bytes this rank puts into the gradient allreduces of one optimizer step (``step``:
        at that step, counting PowerSGD's warm-up; None: once compressing). An estimate from the
        parameters' sizes; a ring allreduce sends and receives about twice that."""
        return self.hook.bytes_per_step(self._model_params, step)

    def barrier(self) -> None:
        dist.barrier()

    def allreduce(self, tensor, op: str = "average"):
        out = tensor.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out / self.size if average_op(op) else out

    def allgather_object(self, obj):
        out: list[Any] = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj, root_rank: int = 0):
        box = [obj]
        dist.broadcast_object_list(box, src=root_rank)
        return box[0]

    def settings(self) -> dict[str, Any]:
        return {"backend": dist.get_backend(), "bucket_cap_mb": self.dcfg.bucket_cap_mb,
                "threads_per_rank": torch.get_num_threads(), **self.hook.settings(),
                "bytes_per_step": self.bytes_per_step()}

