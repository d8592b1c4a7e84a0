"""The server side of the parameter server: one shard, its optimizer, and the consistency rule.

A push is a worker's gradient for this shard, tagged ``TAG_DATA + k`` where ``k`` is the
worker's clock: the 1-based number of the step the gradient completes. The reply to a push is
the shard's parameters (the pull). Modes:

- ``sync``: collect the pushes of step ``version + 1`` from every worker (or the first
  ``workers - backup_workers`` of them), average, take one optimizer step, reply to those
  workers. A push for an older step is late: dropped, counted, answered at once with the
  current parameters (Chen et al. 2016).
- ``async``: apply every push as it arrives and reply at once (Downpour SGD).
- ``ssp``: like async, but the reply to worker w's push ``k`` is held until
  ``k - min(clock of every worker) <= staleness`` (Ho et al. 2013), so no worker starts a step
  more than ``staleness`` steps ahead of the slowest.

Staleness is *measured* separately, from the clocks alone: a push ``k`` from w was computed by
a worker ``(k - 1) - min(clock of the other workers)`` steps ahead of the slowest one.
"""
from __future__ import annotations

import io
import pickle
import time
from typing import Any

import numpy as np
import torch

from .ps_wire import CTRL_CHECKPOINT, CTRL_COUNTERS, CTRL_DONE, CTRL_IDLE, TAG_CTRL, TAG_DATA, TAG_STATE


class ShardServer:
    def __init__(self, strategy: Any, trainer: Any) -> None:
        from mpi4py import MPI

        self.MPI, self.cfg = MPI, strategy.ps
        self.comm, self.ctrl_comm, self.waiter = strategy.world, strategy.ctrl, strategy.waiter
        self.workers = list(strategy.worker_ranks)
        self.shard = strategy.shard           # nn.Parameter over this server's flat range
        self.opt = strategy.server_opt
        self.schedule = trainer.state.scheduler.lr_lambdas[0]
        self.base_lr = trainer.state.scheduler.base_lrs[0]
        n = self.shard.numel()
        self.grads = {w: np.empty(n, dtype=np.float32) for w in self.workers}
        self.acc = np.empty(n, dtype=np.float32)
        self.ctrl = {w: np.zeros(2, dtype=np.int64) for w in self.workers}
        self.version = strategy.start_clock        # optimizer steps applied (sync)
        self.clock = {w: strategy.start_clock for w in self.workers}  # newest push per worker
        self.waiting: set[int] = set()            # workers waiting for a reply from us
        self.held: dict[int, int] = {}           # ssp: worker -> clock whose reply is held
        self.accepted: list[int] = []             # sync: workers whose push counts for this step
        self.done: set[int] = set()
        self.idle: dict[int, int] = {}           # worker -> pushes so far, while between steps
        self.received = {w: strategy.start_clock for w in self.workers}  # pushes per worker
        self.parked: set[int] = set()            # sync: accepted pushes whose buffers are in use
        self.sends: list = []
        self.counters = {"pushes": 0, "pulls": 0, "dropped_gradients": 0, "max_staleness": 0,
                         "bytes_received": 0, "bytes_sent": 0}

    # -- requests ---------------------------------------------------------------------------------
    def _post_data(self, w: int):
        return self.comm.Irecv([self.grads[w], self.MPI.FLOAT], source=w, tag=self.MPI.ANY_TAG)

    def _post_ctrl(self, w: int):
        return self.ctrl_comm.Irecv(self.ctrl[w], source=w, tag=TAG_CTRL)

    def _blocked_on(self) -> list[int]:
        return [w for w in self.workers if w not in self.done and w not in self.waiting]

    def serve(self) -> None:
        # how much of its core the server uses (reported with the counters): a busy-polling
        # wait would make it ~1
        self._wall0, self._cpu0 = time.monotonic(), time.process_time()
        self._serve()

    def _serve(self) -> None:
        n = len(self.workers)
        reqs = [self._post_data(w) for w in self.workers] + [self._post_ctrl(w) for w in self.workers]
        status = self.MPI.Status()
        while len(self.done) < n:
            i = self.waiter.wait_any(reqs, self._blocked_on, status)
            w = self.workers[i % n]
            self.waiter.heard[w] = time.monotonic()
            if i < n:
                repost = self.on_push(w, status.Get_tag() - TAG_DATA)
                if repost:
                    reqs[i] = self._post_data(w)
                else:
                    reqs[i] = self.MPI.REQUEST_NULL
                    self.parked.add(w)
            else:
                self.on_ctrl(w, int(self.ctrl[w][0]), int(self.ctrl[w][1]))
                reqs[i] = self._post_ctrl(w) if w not in self.done else self.MPI.REQUEST_NULL
            for p in [p for p in self.parked if p not in self.accepted]:  # freed by an apply
                reqs[self.workers.index(p)] = self._post_data(p)
                self.parked.discard(p)
        self._flush_sends()
        for r in reqs:
            if r != self.MPI.REQUEST_NULL:
                r.Cancel()
                r.Wait()

    # -- pushes -------------------------------------------------------------------------------------
    def on_push(self, w: int, k: int) -> bool:
        """Handle worker w's push of clock k. Returns whether its buffer is free again."""
        c = self.counters
        c["pushes"] += 1
        self.received[w] += 1
        self.idle.pop(w, None)
        c["bytes_received"] += self.grads[w].nbytes
        others = [self.clock[o] for o in self.workers if o != w and o not in self.done]
        if others:
            c["max_staleness"] = max(c["max_staleness"], (k - 1) - min(others))
        self.clock[w] = max(self.clock[w], k)
        mode = self.cfg.mode
        if mode == "sync":
            if k != self.version + 1:  # computed on parameters older than the current ones
                c["dropped_gradients"] += 1
                self._reply(w)
                return True
            self.accepted.append(w)
            self.waiting.add(w)
            self._maybe_step_sync()
            return False
        self._apply(self.grads[w], step_index=k - 1)
        self.version += 1
        self.waiting.add(w)
        if mode == "async":
            self._reply(w)
        else:
            self.held[w] = k
            self._release_held()
        return True

    def _maybe_step_sync(self) -> None:
        """Step once the first ``workers - backup_workers`` pushes of this step are in (fewer
        when workers have finished: the rest must not wait for gradients that never come)."""
        if not self.accepted:
            return
        # A worker can be left out of this step if it has finished, or if it is idle (in a
        # collective) having already done as many steps as the workers waiting here: it will
        # not push again until they finish theirs. One idle at fewer steps is about to push.
        newest = max(self.received[a] for a in self.accepted)
        absent = sum(1 for w in self.workers if w not in self.accepted and
                     (w in self.done or self.idle.get(w, -1) >= newest))
        needed = min(len(self.workers) - self.cfg.backup_workers, len(self.workers) - absent)
        if len(self.accepted) < needed:
            return
        order = sorted(self.accepted)  # a fixed summation order: deterministic
        acc = self.acc
        np.copyto(acc, self.grads[order[0]])
        for a in order[1:]:
            acc += self.grads[a]
        acc /= np.float32(len(order))
        self._apply(acc, step_index=self.version)
        self.version += 1
        for a in self.accepted:
            self._reply(a)
        self.accepted = []

    def _release_held(self) -> None:
        live = [self.clock[o] for o in self.workers if o not in self.done]
        slowest = min(live) if live else 0
        for w, k in list(self.held.items()):
            if k - slowest <= self.cfg.staleness:
                del self.held[w]
                self._reply(w)

    def _apply(self, grad: np.ndarray, step_index: int) -> None:
        self._flush_sends()  # replies in flight read the shard: let them finish first
        for group in self.opt.param_groups:
            group["lr"] = self.base_lr * self.schedule(step_index)
        self.shard.grad = torch.from_numpy(np.ascontiguousarray(grad, dtype=np.float32))
        self.opt.step()

    def _reply(self, w: int) -> None:
        data = self.shard.detach().numpy()
        self.sends.append(self.comm.Isend([data, self.MPI.FLOAT], dest=w, tag=TAG_DATA + self.version))
        self.waiting.discard(w)
        self.waiter.heard[w] = time.monotonic()
        self.counters["pulls"] += 1
        self.counters["bytes_sent"] += data.nbytes

    def _flush_sends(self) -> None:
        if self.sends:
            self.waiter.wait_all(self.sends, blocked_on=[])
            self.sends = []

    # -- control ------------------------------------------------------------------------------------
    def on_ctrl(self, w: int, kind: int, arg: int) -> None:
        if kind == CTRL_IDLE:
            # control and data travel on different communicators: an idle notice older than
            # the newest push we have from w is stale
            if arg >= self.received[w]:
                self.idle[w] = arg
                if self.cfg.mode == "sync":
                    self._maybe_step_sync()
        elif kind == CTRL_DONE:
            self.done.add(w)
            self.waiting.discard(w)
            self.held.pop(w, None)
            if self.cfg.mode == "ssp":
                self._release_held()  # a finished worker no longer holds the others back
            if self.cfg.mode == "sync":
                self._maybe_step_sync()
        elif kind == CTRL_CHECKPOINT:
            buf = io.BytesIO()
            torch.save({"optimizer": self.opt.state_dict(), "version": self.version}, buf)
            self._send_bytes(w, buf.getvalue())
        elif kind == CTRL_COUNTERS:
            cpu = dict(self.counters, server_cpu_fraction=(time.process_time() - self._cpu0) /
                       max(1e-9, time.monotonic() - self._wall0))
            self._send_bytes(w, pickle.dumps(cpu))

    def _send_bytes(self, w: int, data: bytes) -> None:
        self._flush_sends()
        arr = np.frombuffer(data, dtype=np.uint8)
        req = self.ctrl_comm.Isend([arr, self.MPI.BYTE], dest=w, tag=TAG_STATE)
        self.waiter.wait_all([req], blocked_on=[w])
