"""Parameter server over mpi4py: workers push gradients, servers own parameter shards and run
the optimizer on them (ps-lite style key ranges; sync, async/Downpour, SSP, backup workers).

Roles: the last ``ps.num_servers`` ranks serve, the others are workers (world rank 0 is always
worker 0, which prints and writes checkpoints). With ``mpirun --map-by`` or a host list that
ends in the server hosts (``-H w1:4,w2:4,ps1:1``) the servers get hosts of their own.

The hot path moves flat float32 buffers with mpi4py's buffer calls (``Isend``/``Irecv``): the
model's parameters and gradients are views into one flat vector each, a push is a slice of the
gradient vector, a pull lands directly in the parameter vector. Every shard's push and pull are
posted at once, so the shards travel and are stepped concurrently.
"""
from __future__ import annotations

import pickle
import time
import warnings
from typing import Any

import numpy as np
import torch
from torch import nn

from ..config import TrainConfig, check_world
from ..schedule import build_optimizer
from .base import Strategy, mean_loss_step, threads_per_rank, torch_load_bytes, unwrap
from .ps_wire import (CTRL_CHECKPOINT, CTRL_COUNTERS, CTRL_DONE, CTRL_IDLE, TAG_CTRL, TAG_DATA, TAG_STATE,
                      Waiter, partition)


class ParameterServerStrategy(Strategy):
    name = "ps"

    def __init__(self, cfg: TrainConfig) -> None:
        self.full_cfg, self.ps = cfg, cfg.ps
        self.threads = cfg.runtime.threads
        self.start_clock = 0

    # --- roles -------------------------------------------------------------------------------------
    def init(self) -> None:
        from mpi4py import MPI

        self.MPI = MPI
        self.world = MPI.COMM_WORLD
        self.rank, self.size = self.world.Get_rank(), self.world.Get_size()
        check_world(self.full_cfg, self.size)  # before any communication: all ranks agree
        k = self.ps.num_servers
        self.server_ranks = list(range(self.size - k, self.size))
        self.worker_ranks = list(range(self.size - k))
        self.is_server = self.rank in self.server_ranks
        self.comm = self.world.Split(color=1 if self.is_server else 0, key=self.rank)
        local = self.world.Split_type(MPI.COMM_TYPE_SHARED)
        self.local_rank, self.local_size = local.Get_rank(), local.Get_size()
        local.Free()
        torch.set_num_threads(threads_per_rank(self.threads, self.local_size))
        # control traffic (liveness, aborts, checkpoint/counter requests) on its own
        # communicator: it can never be matched by a data receive that takes any tag
        self.ctrl = self.world.Dup()
        self.waiter = Waiter(self.ctrl, self.ps.timeout_s, self.describe)

    def describe(self, rank: int) -> str:
        if rank in self.server_ranks:
            return f"server {self.server_ranks.index(rank)} (rank {rank})"
        return f"worker {rank} (rank {rank})"

    @property
    def is_worker(self) -> bool:
        return not self.is_server

    @property
    def dp_rank(self) -> int:
        return self.rank if self.is_worker else 0

    @property
    def dp_size(self) -> int:
        return len(self.worker_ranks)

    @property
    def lr_ranks(self) -> int:
        # sync averages the workers' gradients into one step on a global batch; async and SSP
        # apply every worker's gradient as a step of its own, at the single-worker lr
        return self.dp_size if self.ps.mode == "sync" else 1

    # --- setup -------------------------------------------------------------------------------------
    def prepare(self, model, optimizer, accumulation_steps):
        params = [p for p in model.parameters()]
        flat = torch.cat([p.detach().reshape(-1) for p in params]).contiguous()
        self.bounds = partition(flat.numel(), self.ps.num_servers)
        if self.is_server:
            j = self.server_ranks.index(self.rank)
            lo, hi = self.bounds[j]
            self.shard = nn.Parameter(flat[lo:hi].clone())
            self.server_opt = build_optimizer([self.shard], self.full_cfg.optim, self.lr_ranks)
            return model, optimizer
        # the workers' own optimizer never steps (the servers' does); its scheduler only
        # tracks the lr for reporting, so torch's "scheduler before optimizer" warning is moot
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)`")
        # parameters become views into one flat vector, so a pull lands in the model directly;
        # gradients are gathered into a flat buffer after backward (one copy: cheaper than
        # letting autograd accumulate into zeroed views, which reads and writes them twice)
        self.flat, self.grad = flat, torch.zeros_like(flat)
        self.params = params
        offset = 0
        for p in params:
            n = p.numel()
            p.data = self.flat[offset:offset + n].view_as(p)
            offset += n
        self.flat_np, self.grad_np = self.flat.numpy(), self.grad.numpy()
        self.clocks = [self.start_clock] * self.ps.num_servers
        self.steps_done = self.start_clock
        self._idle = False
        return model, optimizer

    # --- the step (workers) --------------------------------------------------------------------------
    def train_step(self, model, optimizer, micro_batches, loss_fn, grad_clip):
        for p in self.params:
            p.grad = None
        loss = mean_loss_step(model, micro_batches, loss_fn)
        torch.cat([p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel())
                   for p in self.params], out=self.grad)
        if self.rank == self.ps.straggler_rank and self.ps.straggler_ms > 0:
            time.sleep(self.ps.straggler_ms / 1000.0)
        MPI = self.MPI
        self.steps_done += 1
        self._idle = False
        recvs, sends = [], []
        for j, (lo, hi) in enumerate(self.bounds):
            recvs.append(self.world.Irecv([self.flat_np[lo:hi], MPI.FLOAT], source=self.server_ranks[j],
                                          tag=MPI.ANY_TAG))
        for j, (lo, hi) in enumerate(self.bounds):
            clock = self.clocks[j] + 1 if self.ps.mode == "sync" else self.steps_done
            sends.append(self.world.Isend([self.grad_np[lo:hi], MPI.FLOAT], dest=self.server_ranks[j],
                                          tag=TAG_DATA + clock))
        statuses = [MPI.Status() for _ in recvs + sends]
        self.waiter.wait_all(recvs + sends, self.server_ranks, statuses)
        for j in range(len(self.bounds)):
            self.clocks[j] = statuses[j].Get_tag() - TAG_DATA  # the server's version
        return loss

    def end_training(self) -> None:
        """Workers: wait for each other, collect the servers' counters, then release them."""
        if not self.is_worker:
            return
        self._collective(self.comm.Ibarrier())
        if self.rank == 0:
            self._counters = self._server_counters()
        self._ctrl_all(CTRL_DONE)

    def serve(self, trainer: Any) -> None:
        from .ps_server import ShardServer

        ShardServer(self, trainer).serve()

    # --- state ---------------------------------------------------------------------------------------
    def broadcast_state(self, model, optimizer) -> None:
        """World rank 0's parameters (and buffers) to every worker and server."""
        if self.is_worker:
            self.world.Bcast([self.flat_np, self.MPI.FLOAT], root=0)
            self.sync_buffers(model)
        else:
            j = self.server_ranks.index(self.rank)
            lo, hi = self.bounds[j]
            full = np.empty(self.bounds[-1][1], dtype=np.float32)
            self.world.Bcast([full, self.MPI.FLOAT], root=0)
            with torch.no_grad():
                self.shard.copy_(torch.from_numpy(full[lo:hi]))

    def checkpoint_payload(self, model, optimizer) -> dict[str, Any]:
        """Worker 0 gathers every server's optimizer state (the parameters it already holds)."""
        states = []
        if self.rank == 0:
            for data in self._ask_all(CTRL_CHECKPOINT):
                states.append(torch_load_bytes(data)["optimizer"])
        return {"model": unwrap(model).state_dict(),
                "optimizer": {"ps_servers": states, "bounds": [list(b) for b in self.bounds]}}

    def load_payload(self, model, optimizer, payload) -> None:
        self.start_clock = int(payload["step"])
        opt = payload["optimizer"]
        if "ps_servers" not in opt or len(opt["ps_servers"]) != self.ps.num_servers:
            from ..config import ConfigError
            raise ConfigError(f"ps.num_servers: the checkpoint was written by a different strategy or "
                              f"server count ({len(opt.get('ps_servers', []))} servers)")
        unwrap(model).load_state_dict(payload["model"])
        if self.is_server:
            j = self.server_ranks.index(self.rank)
            lo, hi = self.bounds[j]
            flat = torch.cat([p.detach().reshape(-1) for p in unwrap(model).parameters()])
            with torch.no_grad():
                self.shard.copy_(flat[lo:hi])
            self.server_opt.load_state_dict(opt["ps_servers"][j])
        else:
            self.clocks = [self.start_clock] * self.ps.num_servers
            self.steps_done = self.start_clock

    # --- collectives among workers ------------------------------------------------------------------
    # Each goes idle first (tells the servers this worker pushes nothing until its next step, so a
    # sync step with backup workers proceeds without it) and waits through the Waiter, so it
    # keeps answering liveness pings while a slower worker finishes its steps.
    def _collective(self, req) -> None:
        self._go_idle()
        self.waiter.wait_all([req], [r for r in self.worker_ranks if r != self.rank])

    def _go_idle(self) -> None:
        if self.is_worker and not self._idle:
            self._ctrl_all(CTRL_IDLE, self.steps_done)
            self._idle = True

    def allreduce_sum(self, tensor):
        out = tensor.clone()
        self._collective(self.comm.Iallreduce(self.MPI.IN_PLACE, out.numpy(), op=self.MPI.SUM))
        return out

    def allgather_object(self, obj):
        data = np.frombuffer(pickle.dumps(obj), dtype=np.uint8)
        sizes = np.zeros(self.comm.Get_size(), dtype=np.int64)
        self._collective(self.comm.Iallgather(np.array([data.size], dtype=np.int64), sizes))
        out = np.empty(int(sizes.sum()), dtype=np.uint8)
        offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        self._collective(self.comm.Iallgatherv(data, [out, sizes, offsets, self.MPI.BYTE]))
        return [pickle.loads(out[o:o + n].tobytes()) for o, n in zip(offsets, sizes)]

    def sync_buffers(self, model: nn.Module) -> None:
        if self.is_worker:
            for b in unwrap(model).buffers():
                self._collective(self.comm.Ibcast(b.numpy(), root=0))

    def broadcast_bytes(self, data):
        """World rank 0's bytes to every rank, servers included (they resume too)."""
        n = np.array([len(data) if data else 0], dtype=np.int64)
        self.world.Bcast(n, root=0)
        if n[0] == 0:
            return b""
        buf = np.frombuffer(bytearray(data), dtype=np.uint8) if self.rank == 0 else np.empty(int(n[0]), dtype=np.uint8)
        self.world.Bcast(buf, root=0)
        return buf.tobytes()

    # --- control messages (worker 0 <-> servers) ----------------------------------------------------------
    def _ctrl_all(self, kind: int, arg: int = 0) -> None:
        msg = np.array([kind, arg], dtype=np.int64)
        reqs = [self.ctrl.Isend(msg, dest=s, tag=TAG_CTRL) for s in self.server_ranks]
        self.waiter.wait_all(reqs, self.server_ranks)

    def _ask_all(self, kind: int) -> list[bytes]:
        self._ctrl_all(kind)
        out = []
        for s in self.server_ranks:
            status = self.MPI.Status()
            self._wait_probe(s, status)
            buf = np.empty(status.Get_count(self.MPI.BYTE), dtype=np.uint8)
            req = self.ctrl.Irecv([buf, self.MPI.BYTE], source=s, tag=TAG_STATE)
            self.waiter.wait_all([req], [s])
            out.append(buf.tobytes())
        return out

    def _wait_probe(self, source: int, status) -> None:
        self.waiter.reset([source])
        delay, since = 0.0, time.monotonic()
        while not self.ctrl.Iprobe(source=source, tag=TAG_STATE, status=status):
            delay = self.waiter._idle({source}, delay, since)

    def counters(self) -> dict[str, Any]:
        return getattr(self, "_counters", {})

    def _server_counters(self) -> dict[str, Any]:
        total: dict[str, Any] = {"workers": self.dp_size, "servers": self.ps.num_servers,
                                 "ps_mode": self.ps.mode}
        for data in self._ask_all(CTRL_COUNTERS):
            for key, value in pickle.loads(data).items():
                combine = max if key in ("max_staleness", "server_cpu_fraction") else (lambda a, b: a + b)
                total[key] = combine(total.get(key, 0), value)
        return total

    def settings(self) -> dict[str, Any]:
        return {"mode": self.ps.mode, "num_servers": self.ps.num_servers, "server_ranks": self.server_ranks,
                "staleness": self.ps.staleness, "backup_workers": self.ps.backup_workers,
                "shard_sizes": [hi - lo for lo, hi in self.bounds] if hasattr(self, "bounds") else None,
                "threads_per_rank": torch.get_num_threads()}

    def shutdown(self) -> None:
        self.waiter.close()
        self.ctrl.Free()
        self.comm.Free()
