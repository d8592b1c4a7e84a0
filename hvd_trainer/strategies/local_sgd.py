"""Local SGD and DiLoCo: each rank steps its own optimizer on its own data, and every
``local.sync_every`` (H) steps the ranks average their parameters with one Horovod allreduce.

Between averagings the ranks' parameters differ; right after one they are identical. The
optimizer state (momentum, Adam's moments) stays local, as in post-local SGD and DiLoCo. The
first ``local.warmup_steps`` steps are fully synchronous (gradients averaged every step:
post-local SGD's warm-up). An epoch's last step always averages, so evaluation and the epoch's
checkpoint see one model.

DiLoCo (``local.outer: sgd | nesterov``): the ranks' average is not taken as is; its difference
from the parameters of the last averaging is a pseudo-gradient for an outer SGD (with Nesterov
momentum) held identically on every rank. Outer lr 1 without momentum is plain averaging.

A checkpoint holds every rank's own parameters and optimizer state (they differ mid-round) and
the outer state, so a resume mid-round continues exactly.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from torch import nn

from ..config import ConfigError, TrainConfig
from ..execution import LossFn
from .base import StepPlan, checked_update, per_rank_checkpoint, ring_bytes, unwrap
from .horovod import HorovodStrategy


def outer_optimizer(anchor: Sequence[torch.Tensor], outer: str, lr: float, momentum: float) -> torch.optim.SGD:
    """The outer optimizer over the parameters of the last averaging (DiLoCo)."""
    return torch.optim.SGD(anchor, lr=lr, momentum=momentum if outer == "nesterov" else 0.0,
                           nesterov=outer == "nesterov" and momentum > 0)


def outer_step(anchor: Sequence[torch.Tensor], averaged: Sequence[torch.Tensor], opt: torch.optim.Optimizer) -> None:
    """One DiLoCo outer step: the pseudo-gradient ``anchor - averaged`` through ``opt``; the
    anchor then holds the new shared parameters."""
    for a, avg in zip(anchor, averaged):
        a.grad = a.detach() - avg
    opt.step()
    opt.zero_grad(set_to_none=True)


class LocalSGDStrategy(HorovodStrategy):
    name = "local_sgd"
    pipelines = False
    agreed_nonfinite = False  # each rank steps on its own gradient between averages

    def __init__(self, cfg: TrainConfig, precision=None, executor=None) -> None:
        super().__init__(cfg, precision, executor)
        self.lcfg = cfg.local
        self.model: Optional[nn.Module] = None
        self.steps_per_epoch = 0
        self.step = 0                 # optimizer steps taken (from the checkpoint on resume)
        self.syncs = 0
        self.anchor: list[torch.Tensor] = []   # the parameters of the last averaging (DiLoCo)
        self.outer: Optional[torch.optim.Optimizer] = None
        self.own_state = False        # resumed each rank's own state: do not overwrite it

    @classmethod
    def check(cls, cfg: TrainConfig, world_size: int) -> None:
        if cfg.horovod.op == "adasum":
            raise ConfigError("horovod.op: adasum is not supported with strategy local_sgd")

    # --- model and step ---------------------------------------------------------------------------
    def prepare(self, model, optimizer, plan: StepPlan):
        self.model, self.steps_per_epoch = model, plan.steps_per_epoch
        return model, optimizer

    def start(self) -> None:
        if self.lcfg.outer != "average" and not self.anchor:
            self._new_anchor()

    def _new_anchor(self, state: Optional[dict[str, Any]] = None) -> None:
        params = [p for p in self.model.parameters()]
        self.anchor = [p.detach().clone() for p in params]
        self.outer = outer_optimizer(self.anchor, self.lcfg.outer, self.lcfg.outer_lr, self.lcfg.outer_momentum)
        if state is not None:
            for a, saved in zip(self.anchor, state["anchor"]):
                a.copy_(saved)
            self.outer.load_state_dict(state["outer"])

    def train_step(self, model, optimizer, micro_batches: Sequence, loss_fn: LossFn, grad_clip: float):
        optimizer.zero_grad()
        loss = self.executor.forward_backward(model, micro_batches, loss_fn, self.precision)
        self.phases.lap("compute")
        if self.step < self.lcfg.warmup_steps:  # post-local SGD: synchronous first
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            averaged = self.hvd.grouped_allreduce(grads, op=self.hvd.Average, name="local_sgd.warmup")
            for g, avg in zip(grads, averaged):
                g.copy_(avg)
            self.bytes_sent += ring_bytes(grads, self.size)
            self.phases.lap("exchange")
        # a non-finite local gradient is this rank's alone: skipped here, or the job ends
        checked_update(model, optimizer, grad_clip, self.precision)
        self.phases.lap("optimizer")
        return loss

    def step_done(self, step: int, epoch_end: bool = False) -> None:
        if epoch_end:  # the epoch's last step averaged already
            return
        self.step = step
        local = step - self.lcfg.warmup_steps
        if local > 0 and (local % self.lcfg.sync_every == 0 or step % self.steps_per_epoch == 0):
            self.average()

    def average(self) -> None:
        """Collective: every rank leaves with the same parameters (and floating buffers)."""
        self.phases.lap("other")
        module = unwrap(self.model)
        params = [p.data for p in module.parameters()]
        buffers = [b for b in module.buffers() if b.is_floating_point()]
        averaged = self.hvd.grouped_allreduce(params + buffers, op=self.hvd.Average, name="local_sgd.average")
        self.bytes_sent += ring_bytes(params + buffers, self.size)
        if self.lcfg.outer == "average":
            for t, avg in zip(params, averaged):
                t.copy_(avg)
        else:
            outer_step(self.anchor, averaged[:len(params)], self.outer)
            for t, a in zip(params, self.anchor):
                t.copy_(a)
        for b, avg in zip(buffers, averaged[len(params):]):
            b.copy_(avg)
        self.syncs += 1
        self.phases.lap("exchange")

    # --- state ------------------------------------------------------------------------------------
    def checkpoint_state(self, model, optimizer) -> dict[str, Any]:
        """Collective: every rank's own parameters and optimizer state (they differ mid-round),
        and the outer state (the same on every rank)."""
        mine = {"model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict()}
        ranks = self.allgather_object(mine)
        outer = ({"anchor": [a.clone() for a in self.anchor], "outer": self.outer.state_dict()}
                 if self.outer is not None else None)
        return {"model": mine["model"], "optimizer": {"local_sgd": {"ranks": ranks, "outer": outer,
                                                                    "syncs": self.syncs}}}

    def check_checkpoint(self, strategy: str, world_size: int) -> int:
        return per_rank_checkpoint(self.name, self.size, strategy, world_size,
                                   "each rank's own state cannot be re-dealt")

    def load_checkpoint_state(self, model, optimizer, payload) -> None:
        saved = payload["optimizer"].get("local_sgd") if isinstance(payload["optimizer"], dict) else None
        self.step = int(payload["step"])
        if saved is None:  # a replicated strategy's checkpoint: every rank starts from it alike
            super().load_checkpoint_state(model, optimizer, payload)
            return
        own = saved["ranks"][self.rank]
        unwrap(model).load_state_dict(own["model"])
        optimizer.load_state_dict(own["optimizer"])
        self.syncs = int(saved["syncs"])
        if saved["outer"] is not None and self.lcfg.outer != "average":
            self._new_anchor(saved["outer"])
        self.own_state = True

    def broadcast_parameters(self, model, root_rank: int = 0) -> None:
        if not self.own_state:
            super().broadcast_parameters(model, root_rank)

    def broadcast_optimizer_state(self, optimizer, root_rank: int = 0) -> None:
        if not self.own_state:
            super().broadcast_optimizer_state(optimizer, root_rank)

    def settings(self) -> dict[str, Any]:
        out = super().settings()
        out.update(sync_every=self.lcfg.sync_every, warmup_steps=self.lcfg.warmup_steps, outer=self.lcfg.outer,
                   outer_lr=self.lcfg.outer_lr, outer_momentum=self.lcfg.outer_momentum)
        return out

    def counters(self) -> dict[str, Any]:
        return {"averagings": self.syncs}
