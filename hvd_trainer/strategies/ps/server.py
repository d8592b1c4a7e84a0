"""A parameter-server rank: one shard of the flat parameter vector, its optimizer, and the
consistency rule (:mod:`.rules`) that decides when a push becomes a step.

The wire: a push is a worker's gradient for this shard on ``world`` with tag ``TAG_DATA + k``
(``k``: the step it completes); the reply is the shard's parameters with tag ``TAG_DATA +
version``. Control messages (idle, done, checkpoint and counter requests) come on ``ctrl_comm``.
Every wait goes through the :class:`~.wire.Waiter`, so a dead or frozen worker ends the job.
"""
from __future__ import annotations

import io
import pickle
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from torch import nn

from ...config import OptimConfig
from ...schedule import build_optimizer
from .rules import Apply, Drop, Reply, Rule
from .wire import CTRL_CHECKPOINT, CTRL_COUNTERS, CTRL_DONE, CTRL_IDLE, TAG_CTRL, TAG_DATA, TAG_STATE, Waiter


@dataclass
class Link:
    """How a server reaches its workers."""

    world: Any                # communicator of pushes and pulls (world ranks)
    ctrl_comm: Any            # communicator of control messages (a duplicate of world)
    waiter: Waiter            # liveness-checked waits on ctrl_comm
    workers: Sequence[int]    # world ranks of the workers


class ShardServer:
    """Serves the key range ``key_range`` of the flat parameter vector.

    ``shard``: its initial parameters; ``optim``/``lr_ranks``: the optimizer it runs (the lr
    scaled as for the workers); ``lr_at(step)``: the multiplier of that lr at a 0-based step;
    ``resume``: the optimizer state from a checkpoint (None for a fresh start); ``rule``: the
    consistency rule, already at the resumed step.
    """

    def __init__(self, shard: np.ndarray, key_range: tuple[int, int], optim: OptimConfig, lr_ranks: int,
                 lr_at: Callable[[int], float], rule: Rule, link: Link, resume: Optional[dict] = None) -> None:
        from mpi4py import MPI

        self.MPI, self.link, self.rule = MPI, link, rule
        self.key_range = key_range
        self.shard = nn.Parameter(torch.from_numpy(np.array(shard, dtype=np.float32)))
        self.opt = build_optimizer([self.shard], optim, lr_ranks)
        self.base_lr = self.opt.param_groups[0]["lr"]  # the scaled lr, before a resumed state's
        if resume is not None:
            self.opt.load_state_dict(resume)
        self.lr_at = lr_at
        n = self.shard.numel()
        self.grads = {w: np.empty(n, dtype=np.float32) for w in link.workers}
        self.acc = np.empty(n, dtype=np.float32)
        self.ctrl_bufs = {w: np.zeros(2, dtype=np.int64) for w in link.workers}
        self.sends: list = []
        self.counters = {"pushes": 0, "pulls": 0, "dropped_gradients": 0,
                         "bytes_received": 0, "bytes_sent": 0}

    # -- the loop -----------------------------------------------------------------------------------
    def serve(self) -> None:
        """Until every worker has finished. Reports how much of its core it used with the
        counters (a busy-polling wait would make that ~1)."""
        self._wall0, self._cpu0 = time.monotonic(), time.process_time()
        MPI, link, rule = self.MPI, self.link, self.rule
        workers = list(link.workers)
        n = len(workers)
        reqs = [self._post_push(w) for w in workers] + [self._post_ctrl(w) for w in workers]
        parked: set[int] = set()  # workers whose gradient buffer is still in use
        status = MPI.Status()
        while not rule.all_done:
            i = link.waiter.wait_any(reqs, rule.blocked_on, status)
            w = workers[i % n]
            link.waiter.heard_from(w)
            if i < n:
                self._count_push(w)
                self._carry_out(rule.push(w, status.Get_tag() - TAG_DATA))
                if rule.holds_buffer(w):
                    reqs[i] = MPI.REQUEST_NULL
                    parked.add(w)
                else:
                    reqs[i] = self._post_push(w)
            else:
                self._on_ctrl(w, int(self.ctrl_bufs[w][0]), int(self.ctrl_bufs[w][1]))
                reqs[i] = self._post_ctrl(w) if w not in rule.done else MPI.REQUEST_NULL
            for p in [p for p in parked if not rule.holds_buffer(p)]:  # freed by an apply
                reqs[workers.index(p)] = self._post_push(p)
                parked.discard(p)
        self._flush_sends()
        for r in reqs:
            if r != MPI.REQUEST_NULL:
                r.Cancel()
                r.Wait()

    def _post_push(self, w: int):
        return self.link.world.Irecv([self.grads[w], self.MPI.FLOAT], source=w, tag=self.MPI.ANY_TAG)

    def _post_ctrl(self, w: int):
        return self.link.ctrl_comm.Irecv(self.ctrl_bufs[w], source=w, tag=TAG_CTRL)

    def _count_push(self, w: int) -> None:
        self.counters["pushes"] += 1
        self.counters["bytes_received"] += self.grads[w].nbytes

    # -- actions ------------------------------------------------------------------------------------
    def _carry_out(self, actions) -> None:
        for action in actions:
            if isinstance(action, Apply):
                self._apply(action.workers, action.step_index)
            else:
                if isinstance(action, Drop):
                    self.counters["dropped_gradients"] += 1
                self._reply(action.worker)

    def _apply(self, workers: tuple[int, ...], step_index: int) -> None:
        self._flush_sends()  # replies in flight read the shard: let them finish first
        if len(workers) == 1:
            grad = self.grads[workers[0]]
        else:  # a fixed summation order (ascending ranks): deterministic
            grad = self.acc
            np.copyto(grad, self.grads[workers[0]])
            for w in workers[1:]:
                grad += self.grads[w]
            grad /= np.float32(len(workers))
        for group in self.opt.param_groups:
            group["lr"] = self.base_lr * self.lr_at(step_index)
        self.shard.grad = torch.from_numpy(grad)
        self.opt.step()
        self.shard.grad = None

    def _reply(self, w: int) -> None:
        data = self.shard.detach().numpy()
        self.sends.append(self.link.world.Isend([data, self.MPI.FLOAT], dest=w, tag=TAG_DATA + self.rule.version))
        self.link.waiter.heard_from(w)
        self.counters["pulls"] += 1
        self.counters["bytes_sent"] += data.nbytes

    def _flush_sends(self) -> None:
        if self.sends:
            self.link.waiter.wait_all(self.sends, blocked_on=[])
            self.sends = []

    # -- control ------------------------------------------------------------------------------------
    def _on_ctrl(self, w: int, kind: int, arg: int) -> None:
        if kind == CTRL_IDLE:
            self._carry_out(self.rule.went_idle(w, arg))
        elif kind == CTRL_DONE:
            self._carry_out(self.rule.finished(w))
        elif kind == CTRL_CHECKPOINT:
            buf = io.BytesIO()
            torch.save({"optimizer": self.opt.state_dict(), "version": self.rule.version}, buf)
            self._send_state(w, buf.getvalue())
        elif kind == CTRL_COUNTERS:
            self._send_state(w, pickle.dumps(self.report()))

    def report(self) -> dict[str, Any]:
        return dict(self.counters, max_staleness=self.rule.max_staleness,
                    server_cpu_fraction=(time.process_time() - self._cpu0) / max(1e-9, time.monotonic() - self._wall0))

    def _send_state(self, w: int, data: bytes) -> None:
        self._flush_sends()
        self.link.waiter.send_bytes(w, data, TAG_STATE)
