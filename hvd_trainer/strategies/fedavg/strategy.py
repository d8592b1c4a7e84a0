"""FedAvg (McMahan et al. 2017) with virtual clients, and FedProx's proximal term.

K clients hold a partition of the training set (IID, or Dirichlet(alpha) over labels). Each
round (one epoch of the loop) a seeded fraction C of them is sampled and dealt to the ranks;
each rank simulates its clients one after another (one loop step each): from the round's global
model, ``fedavg.local_epochs`` epochs of SGD at ``batch_size`` over the client's data, with a
fresh optimizer state. At the round's last step one Horovod allreduce sums every client's
``n_k * w_k`` and ``n_k``, and every rank takes the weighted mean as the next global model.

No rank plays the server: the weighted mean is an allreduce, after which every rank holds the
global model, so there is no server link carrying N models and no rank to lose it. (The
parameter-server ranks would add a hop and a single point of failure for one sum a round.)

The round's end is the only collective of training, so a stop signal or a lost rank is agreed
at a client boundary; a checkpoint holds every rank's partial sums, so a run stopped mid-round
resumes exactly.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

from ...config import ConfigError, TrainConfig
from ...execution import LossFn
from ..base import StepPlan, checked_update, per_rank_checkpoint, ring_bytes, unwrap
from ..horovod import HorovodStrategy
from .partition import weighted_mean
from .rounds import ClientRounds


class FedAvgStrategy(HorovodStrategy):
    name = "fedavg"
    pipelines = False
    agreed_nonfinite = False  # each client steps on its own gradient within a round

    def __init__(self, cfg: TrainConfig, precision=None, executor=None) -> None:
        super().__init__(cfg, precision, executor)
        self.fcfg = cfg.fedavg
        self.rounds: Optional[ClientRounds] = None
        self.model: Optional[nn.Module] = None
        self.steps_per_round = 1
        self.step = 0                     # loop steps (clients) taken, from the checkpoint on resume
        self.rounds_done = 0
        self.global_flat: Optional[torch.Tensor] = None  # the round's global model, flat
        self.total: Optional[torch.Tensor] = None        # sum of n_k * w_k of this rank's clients
        self.weight = 0.0                                 # sum of n_k

    @classmethod
    def check(cls, cfg: TrainConfig, world_size: int) -> None:
        f = cfg.fedavg
        if f.clients < world_size:
            raise ConfigError(f"fedavg.clients: {f.clients} clients for {world_size} ranks; each rank "
                              f"simulates at least one")
        if cfg.optim.accumulation_steps != 1:
            raise ConfigError("optim.accumulation_steps: must be 1 with strategy fedavg (a client's "
                              "local epochs are its steps)")
        if cfg.horovod.op == "adasum":
            raise ConfigError("horovod.op: adasum is not supported with strategy fedavg")
        if cfg.model.sync_batchnorm:  # a collective in every forward, and the ranks' clients differ in size
            raise ConfigError("model.sync_batchnorm: not supported with strategy fedavg")

    @property
    def lr_ranks(self) -> int:
        return 1  # every client trains alone, at the lr of one rank

    # --- the data ---------------------------------------------------------------------------------
    def training_batches(self, train, cfg: TrainConfig):
        if not isinstance(train, TensorDataset):
            raise ConfigError(f"data.name: strategy fedavg partitions in-memory labelled tensors "
                              f"(digits, synthetic, npz), not {cfg.data.name}")
        f = self.fcfg
        self.rounds = ClientRounds(train, f.clients, f.fraction, f.alpha, cfg.seed, self.rank, self.size)
        return self.rounds

    # --- model and step ---------------------------------------------------------------------------
    def prepare(self, model, optimizer, plan: StepPlan):
        self.model, self.steps_per_round = model, plan.steps_per_epoch
        return model, optimizer

    def _tensors(self) -> list[torch.Tensor]:
        module = unwrap(self.model)
        return [p.data for p in module.parameters()] + [b for b in module.buffers() if b.is_floating_point()]

    def _flat(self) -> torch.Tensor:
        return torch.cat([t.reshape(-1).double() for t in self._tensors()])

    def _load(self, flat: torch.Tensor) -> None:
        offset = 0
        for t in self._tensors():
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()

    def start(self) -> None:
        if self.global_flat is None:
            self.global_flat = self._flat()
        if self.total is None:
            self.total = torch.zeros_like(self.global_flat)

    def train_step(self, model, optimizer, micro_batches: Sequence, loss_fn: LossFn, grad_clip: float):
        client, x, y = micro_batches[0]
        self._load(self.global_flat)  # every client of a round starts from the global model
        if len(y) == 0:  # a padding step: this rank has no client left in the round
            self.phases.lap("compute")
            return None
        f, n = self.fcfg, len(y)
        optimizer.state.clear()  # a client's optimizer starts afresh
        g = torch.Generator().manual_seed(int(np.random.SeedSequence(
            [self.cfg.seed, self.step // self.steps_per_round, int(client)]).generate_state(1)[0]))
        params = [p for p in model.parameters()]
        anchor = [p.detach().clone() for p in params] if f.mu > 0 else []

        def local_loss(out, target):
            loss = loss_fn(out, target)
            if anchor:  # FedProx: stay near the global model
                loss = loss + f.mu / 2 * sum(((p - a) ** 2).sum() for p, a in zip(params, anchor))
            return loss

        losses = []
        for _ in range(f.local_epochs):
            order = torch.randperm(n, generator=g)
            for i in range(0, n, self.cfg.batch_size):
                idx = order[i:i + self.cfg.batch_size]
                optimizer.zero_grad()
                losses.append(self.executor.forward_backward(model, [(x[idx], y[idx])], local_loss, self.precision))
                checked_update(model, optimizer, grad_clip, self.precision)
        self.total += n * self._flat()
        self.weight += n
        self.phases.lap("compute")
        return torch.stack(losses).mean()

    def step_done(self, step: int, epoch_end: bool = False) -> None:
        if epoch_end:
            return
        self.step = step
        if step % self.steps_per_round == 0:
            self._aggregate()

    def _aggregate(self) -> None:
        """Collective, at a round's last step: the weighted mean of the round's clients."""
        self.phases.lap("other")
        mine = torch.cat([self.total, torch.tensor([self.weight], dtype=torch.float64)])
        summed = self.hvd.allreduce(mine, op=self.hvd.Sum, name="fedavg.round")
        self.bytes_sent += ring_bytes([mine], self.size)
        self.global_flat = torch.from_numpy(weighted_mean(summed[:-1].numpy(), float(summed[-1]),
                                                          self.global_flat.numpy()))
        self._load(self.global_flat)
        self.total.zero_()
        self.weight = 0.0
        self.rounds_done += 1
        self.phases.lap("exchange")

    # --- state ------------------------------------------------------------------------------------
    def checkpoint_state(self, model, optimizer) -> dict[str, Any]:
        """Collective: the global model (the checkpoint's ``model``), and every rank's partial
        sums of the round (a stop between two clients resumes exactly)."""
        ranks = self.allgather_object({"total": self.total.clone(), "weight": self.weight})
        current = self._flat()
        self._load(self.global_flat)
        global_model = {k: v.clone() for k, v in unwrap(model).state_dict().items()}
        self._load(current)
        return {"model": global_model, "optimizer": {"fedavg": {"ranks": ranks, "global": self.global_flat.clone(),
                                                                "rounds": self.rounds_done}}}

    def check_checkpoint(self, strategy: str, world_size: int) -> int:
        return per_rank_checkpoint(self.name, self.size, strategy, world_size,
                                   "its clients' partial sums cannot be re-dealt")

    def load_checkpoint_state(self, model, optimizer, payload) -> Optional[str]:
        unwrap(model).load_state_dict(payload["model"])  # the global model
        self.step = int(payload["step"])
        self.global_flat = self._flat()
        saved = payload["optimizer"].get("fedavg") if isinstance(payload["optimizer"], dict) else None
        if saved is not None:
            own = saved["ranks"][self.rank]
            self.total, self.weight = own["total"].clone(), float(own["weight"])
            self.global_flat, self.rounds_done = saved["global"].clone(), int(saved["rounds"])
        return None

    def broadcast_optimizer_state(self, optimizer, root_rank: int = 0) -> None:
        pass  # each client's optimizer starts afresh: there is no state to share

    def settings(self) -> dict[str, Any]:
        out = super().settings()
        out.update(self.fcfg.model_dump())
        return out

    def counters(self) -> dict[str, Any]:
        r = self.rounds
        return {"rounds": self.rounds_done,
                "clients": {"sizes": r.sizes(), "label_counts": r.label_counts()} if r is not None else {}}
