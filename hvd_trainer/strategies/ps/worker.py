"""Parameter server over mpi4py, the training side: workers push gradients, servers own
parameter shards and run the optimizer on them (ps-lite style key ranges; sync, async/Downpour,
SSP, backup workers — the rules are in :mod:`.rules`, the server in :mod:`.server`).

Roles: the last ``ps.num_servers`` ranks serve, the others are workers (world rank 0 is always
worker 0, which prints and writes checkpoints). ``role()`` hands a server rank its duty, so the
training loop runs on workers only. With ``mpirun --map-by`` or a host list that ends in the
server hosts (``-H w1:4,w2:4,ps1:1``) the servers get hosts of their own.

Start: after the workers have agreed on the initial (or resumed) state, worker 0 sends each
server a start message: its key range and parameters, the step to resume from, the lr schedule's
shape, and its optimizer state from the checkpoint; or the config error that stopped the
workers, so the servers leave the same way.

The hot path moves flat float32 buffers with mpi4py's buffer calls (``Isend``/``Irecv``): the
model's parameters and gradients are views into one flat vector each, a push is a slice of the
gradient vector, a pull lands directly in the parameter vector. Every shard's push and pull are
posted at once, so the shards travel and are stepped concurrently.
"""
from __future__ import annotations

import io
import pickle
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch import nn

from ...checkpoint import torch_load_bytes
from ...config import ConfigError, TrainConfig
from ...runtime import world as run_world
from ...schedule import lr_factor
from ..base import NonFiniteGradient, StepPlan, Strategy, average_op, threads_per_rank, unwrap
from .rules import make_rule
from .server import Link, ShardServer
from .wire import CTRL_CHECKPOINT, CTRL_COUNTERS, CTRL_DONE, CTRL_IDLE, TAG_CTRL, TAG_DATA, TAG_STATE, Waiter, partition


class ParameterServerStrategy(Strategy):
    name = "ps"
    agreed_nonfinite = False  # a worker checks its own gradient, not the servers' average

    def __init__(self, cfg: TrainConfig, precision=None, executor=None) -> None:
        super().__init__(cfg, precision, executor)
        self.pcfg = cfg.ps
        self.start_step = 0
        self.server_states: Optional[list] = None  # from a checkpoint, for worker 0 to hand out
        self.started = False
        self.steps_done, self.idle = 0, False
        self.waiter: Optional[Waiter] = None
        self._counters: dict[str, Any] = {}

    @classmethod
    def check(cls, cfg: TrainConfig, world_size: int) -> None:
        ps = cfg.ps
        if ps.num_servers > world_size - 1:
            raise ConfigError(f"ps.num_servers: at most world size - 1 = {world_size - 1}, got {ps.num_servers}")
        workers = world_size - ps.num_servers
        if ps.backup_workers >= workers:
            raise ConfigError(f"ps.backup_workers: must be < number of workers ({workers}), got {ps.backup_workers}")
        if ps.backup_workers and ps.mode != "sync":
            raise ConfigError("ps.backup_workers: only with ps.mode=sync")
        # the servers apply each gradient as it comes, and the averaged gradient exists only in
        # shards on the servers: no skipping, clipping or unscaling it on a worker
        if cfg.optim.nonfinite == "skip":
            raise ConfigError("optim.nonfinite: skip is not supported with strategy=ps; use stop")
        if cfg.optim.grad_clip > 0:
            raise ConfigError("optim.grad_clip: not supported with strategy=ps (the averaged gradient "
                              "exists only in shards on the servers)")
        if cfg.optim.precision == "fp16":
            raise ConfigError("optim.precision: fp16 is not supported with strategy=ps (the servers "
                              "would have to unscale); use bf16")

    # --- roles -------------------------------------------------------------------------------------
    def init(self) -> None:
        """No communication yet: the roles follow from rank and size alone."""
        from mpi4py import MPI

        self.MPI = MPI
        self.world = run_world.comm()
        self.rank, self.size = self.world.Get_rank(), self.world.Get_size()
        k = self.pcfg.num_servers
        self.server_ranks = list(range(self.size - k, self.size))
        self.worker_ranks = list(range(self.size - k))

    def role(self) -> Optional[Callable[[], None]]:
        self._connect()
        return self._serve if self.rank in self.server_ranks else None

    def _connect(self) -> None:
        """Every rank: the workers' communicator, the control communicator, the Waiter."""
        MPI = self.MPI
        is_server = self.rank in self.server_ranks
        self.workers_comm = self.world.Split(color=1 if is_server else 0, key=self.rank)
        local = self.world.Split_type(MPI.COMM_TYPE_SHARED)
        self.local_rank, self.local_size = local.Get_rank(), local.Get_size()
        local.Free()
        torch.set_num_threads(threads_per_rank(self.cfg.runtime.threads, self.local_size))
        # control traffic (liveness, aborts, start, checkpoint/counter requests) on its own
        # communicator: it can never be matched by a data receive that takes any tag
        self.ctrl_comm = self.world.Dup()
        self.waiter = Waiter(self.ctrl_comm, self.pcfg.timeout_s, self.describe)

    def describe(self, rank: int) -> str:
        if rank in self.server_ranks:
            return f"server {self.server_ranks.index(rank)} (rank {rank})"
        return f"worker {rank} (rank {rank})"

    @property
    def dp_size(self) -> int:
        return len(self.worker_ranks)

    @property
    def lr_ranks(self) -> int:
        # sync averages the workers' gradients into one step on a global batch; async and SSP
        # apply every worker's gradient as a step of its own, at the single-worker lr
        return self.dp_size if self.pcfg.mode == "sync" else 1

    # --- the server's duty ---------------------------------------------------------------------------
    def _serve(self) -> None:
        start = torch_load_bytes(self.waiter.recv_bytes(0, TAG_STATE))
        if start["error"]:
            raise ConfigError(start["error"])  # the workers' own verdict: leave alike
        p = self.pcfg
        rule = make_rule(p.mode, self.worker_ranks, start["step"], p.staleness, p.backup_workers)
        lr_at = lr_factor(self.cfg.optim, self.lr_ranks, start["steps_per_epoch"], start["epochs"])
        link = Link(self.world, self.ctrl_comm, self.waiter, self.worker_ranks)
        ShardServer(start["shard"].numpy(), tuple(start["key_range"]), self.cfg.optim, self.lr_ranks, lr_at,
                    rule, link, start["optimizer"]).serve()

    def _send_start(self, error: Optional[str] = None) -> None:
        """Worker 0 -> every server: what it needs to serve (or the error that ended the run)."""
        for j, s in enumerate(self.server_ranks):
            if error:
                msg: dict[str, Any] = {"error": error}
            else:
                lo, hi = self.bounds[j]
                msg = {"error": "", "shard": self.flat[lo:hi].clone(), "key_range": [lo, hi],
                       "step": self.start_step, "steps_per_epoch": self.plan.steps_per_epoch,
                       "epochs": self.plan.epochs,
                       "optimizer": self.server_states[j] if self.server_states else None}
            buf = io.BytesIO()
            torch.save(msg, buf)
            self.waiter.send_bytes(s, buf.getvalue(), TAG_STATE)

    # --- setup (workers) -----------------------------------------------------------------------------
    def prepare(self, model, optimizer, plan: StepPlan):
        self.plan = plan
        params = list(model.parameters())
        flat = torch.cat([p.detach().reshape(-1) for p in params]).contiguous()
        self.bounds = partition(flat.numel(), self.pcfg.num_servers)
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
        self._set_clock(self.start_step)
        return model, optimizer

    def _set_clock(self, step: int) -> None:
        self.clocks = [step] * self.pcfg.num_servers  # the servers' versions, as last seen
        self.steps_done = step
        self.idle = False

    # --- the step (workers) --------------------------------------------------------------------------
    def train_step(self, model, optimizer, micro_batches, loss_fn, grad_clip):
        for p in self.params:
            p.grad = None
        loss = self.executor.forward_backward(model, micro_batches, loss_fn, self.precision)  # fp32 or bf16
        self.phases.lap("compute")
        if not bool(torch.isfinite(loss)):  # this worker's own verdict: never push it
            raise NonFiniteGradient(f"loss {float(loss)}")
        torch.cat([p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel())
                   for p in self.params], out=self.grad)
        for p in self.params:
            p.grad = None
        # The servers step the parameters; this no-op step (no gradients) keeps the workers'
        # optimizer and lr scheduler in their usual order (the lr is reported from it).
        optimizer.step()
        self.phases.lap("optimizer")  # the real update happens on the servers, inside the exchange
        MPI = self.MPI
        self.steps_done += 1
        self.idle = False
        recvs, sends = [], []
        for j, (lo, hi) in enumerate(self.bounds):
            recvs.append(self.world.Irecv([self.flat_np[lo:hi], MPI.FLOAT], source=self.server_ranks[j],
                                          tag=MPI.ANY_TAG))
        for j, (lo, hi) in enumerate(self.bounds):
            clock = self.clocks[j] + 1 if self.pcfg.mode == "sync" else self.steps_done
            sends.append(self.world.Isend([self.grad_np[lo:hi], MPI.FLOAT], dest=self.server_ranks[j],
                                          tag=TAG_DATA + clock))
        statuses = [MPI.Status() for _ in recvs + sends]
        self.waiter.wait_all(recvs + sends, self.server_ranks, statuses)
        for j in range(len(self.bounds)):
            self.clocks[j] = statuses[j].Get_tag() - TAG_DATA  # the server's version
        self.phases.lap("exchange")
        return loss

    # --- state (workers) -----------------------------------------------------------------------------
    def broadcast_parameters(self, model, root_rank: int = 0) -> None:
        self._collective(self.workers_comm.Ibcast([self.flat_np, self.MPI.FLOAT], root=root_rank))
        self.broadcast_buffers(model, root_rank)

    def broadcast_optimizer_state(self, optimizer, root_rank: int = 0) -> None:
        """The workers' optimizer never steps (the servers hold the real one): nothing to do."""

    def broadcast_buffers(self, model: nn.Module, root_rank: int = 0) -> None:
        for b in unwrap(model).buffers():
            self._collective(self.workers_comm.Ibcast(b.numpy(), root=root_rank))

    def start(self) -> None:
        """Worker 0 starts the servers with the state the workers agreed on."""
        if self.rank == 0:
            self._send_start()
        self.started = True

    def barrier(self) -> None:
        self._collective(self.workers_comm.Ibarrier())

    def check_checkpoint(self, strategy: str, world_size: int) -> int:
        if strategy != self.name:
            raise ConfigError(f"checkpoint: written by strategy={strategy}, this run is "
                              f"strategy={self.name}: set checkpoint.resume=never or another run_dir")
        return world_size - self.pcfg.num_servers  # the same server count (load_checkpoint_state checks)

    def checkpoint_state(self, model, optimizer) -> dict[str, Any]:
        """Worker 0 gathers every server's optimizer state (the parameters it holds itself)."""
        states = []
        if self.rank == 0:
            for s in self.server_ranks:
                self._ctrl(s, CTRL_CHECKPOINT)
                states.append(torch_load_bytes(self.waiter.recv_bytes(s, TAG_STATE))["optimizer"])
        return {"model": unwrap(model).state_dict(),
                "optimizer": {"ps_servers": states, "bounds": [list(b) for b in self.bounds]}}

    def load_checkpoint_state(self, model, optimizer, payload) -> None:
        opt = payload["optimizer"]
        if "ps_servers" not in opt or len(opt["ps_servers"]) != self.pcfg.num_servers:
            raise ConfigError(f"ps.num_servers: the checkpoint was written by a different strategy or "
                              f"server count ({len(opt.get('ps_servers', []))} servers)")
        try:
            unwrap(model).load_state_dict(payload["model"])
        except RuntimeError as err:
            raise ConfigError(f"checkpoint: written for another model ({str(err).splitlines()[0]})") from None
        self.server_states = list(opt["ps_servers"])
        self.start_step = int(payload["step"])
        self._set_clock(self.start_step)

    # --- collectives among workers ------------------------------------------------------------------
    # Each goes idle first (tells the servers this worker pushes nothing until its next step, so a
    # sync step with backup workers proceeds without it) and waits through the Waiter, so it
    # keeps answering liveness pings while a slower worker finishes its steps.
    def _collective(self, req) -> None:
        if not self.idle:
            for s in self.server_ranks:
                self._ctrl(s, CTRL_IDLE, self.steps_done)
            self.idle = True
        self.waiter.wait_all([req], [r for r in self.worker_ranks if r != self.rank])

    def _ctrl(self, server: int, kind: int, arg: int = 0) -> None:
        msg = np.array([kind, arg], dtype=np.int64)
        self.waiter.wait_all([self.ctrl_comm.Isend(msg, dest=server, tag=TAG_CTRL)], [server])

    def allreduce(self, tensor, op: str = "average"):
        out = tensor.clone()
        self._collective(self.workers_comm.Iallreduce(self.MPI.IN_PLACE, out.numpy(), op=self.MPI.SUM))
        return out / self.dp_size if average_op(op) else out

    def allgather_object(self, obj):
        data = np.frombuffer(pickle.dumps(obj), dtype=np.uint8)
        sizes = np.zeros(self.dp_size, dtype=np.int64)
        self._collective(self.workers_comm.Iallgather(np.array([data.size], dtype=np.int64), sizes))
        out = np.empty(int(sizes.sum()), dtype=np.uint8)
        offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        self._collective(self.workers_comm.Iallgatherv(data, [out, sizes, offsets, self.MPI.BYTE]))
        return [pickle.loads(out[o:o + n].tobytes()) for o, n in zip(offsets, sizes)]

    def broadcast_object(self, obj, root_rank: int = 0):
        data = np.frombuffer(pickle.dumps(obj), dtype=np.uint8) if self.rank == root_rank else None
        n = np.array([data.size if data is not None else 0], dtype=np.int64)
        self._collective(self.workers_comm.Ibcast(n, root=root_rank))
        buf = data.copy() if data is not None else np.empty(int(n[0]), dtype=np.uint8)
        self._collective(self.workers_comm.Ibcast(buf, root=root_rank))
        return pickle.loads(buf.tobytes())

    # --- reporting and the end -------------------------------------------------------------------------
    def counters(self) -> dict[str, Any]:
        """Workers wait for each other (the servers' counts are final then); worker 0 collects."""
        self.barrier()
        if self.rank != 0:
            return {}
        total: dict[str, Any] = {"workers": self.dp_size, "servers": self.pcfg.num_servers,
                                 "ps_mode": self.pcfg.mode}
        for s in self.server_ranks:
            self._ctrl(s, CTRL_COUNTERS)
            for key, value in pickle.loads(self.waiter.recv_bytes(s, TAG_STATE)).items():
                combine = max if key in ("max_staleness", "server_cpu_fraction") else (lambda a, b: a + b)
                total[key] = combine(total.get(key, 0), value)
        return total

    def settings(self) -> dict[str, Any]:
        return {"mode": self.pcfg.mode, "num_servers": self.pcfg.num_servers, "server_ranks": self.server_ranks,
                "staleness": self.pcfg.staleness, "backup_workers": self.pcfg.backup_workers,
                "shard_sizes": [hi - lo for lo, hi in self.bounds] if hasattr(self, "bounds") else None,
                "threads_per_rank": torch.get_num_threads()}

    def shutdown(self, reason: Optional[str] = None) -> None:
        if self.waiter is None:  # never connected (a config error before role())
            return
        if self.rank in self.worker_ranks:
            if self.started:
                for s in self.server_ranks:  # this worker trains no more: servers stop waiting on it
                    self._ctrl(s, CTRL_DONE)
            elif self.rank == 0:
                self._send_start(error=reason or "the workers stopped before training")
        self.waiter.close()
        self.ctrl_comm.Free()
        self.workers_comm.Free()
