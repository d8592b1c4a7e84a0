"""The training state: everything an exact resume needs, in one object.

``state_dict()`` returns exactly the keys of :data:`hvd_trainer.checkpoint.SCHEMA`;
``load_state_dict()`` puts them back. This is the shape a checkpoint, a preemption handler and
Horovod elastic's ``commit()``/``restore()`` all call.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from . import rng
from .checkpoint import FORMAT, SCHEMA
from .config import ConfigError
from .strategies.base import Strategy


class TrainState:
    """Model, optimizer, lr schedule, position in the data, and every rank's random streams."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler,
                 strategy: Strategy, config: dict[str, Any]) -> None:
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.strategy = strategy
        self.config = config
        self.step = 0            # optimizer steps taken
        self.epoch = 0           # completed epochs
        self.batch_in_epoch = 0  # micro-batches consumed in the current epoch

    def state_dict(self) -> dict[str, Any]:
        """Collective over the training ranks (gathers their RNG streams; a parameter server's
        worker 0 collects its servers' state); every rank gets the whole payload."""
        s = self.strategy
        rngs = s.allgather_object(rng.capture())
        payload = {"format": FORMAT, **s.state_dict(self.model, self.optimizer),
                   "scheduler": self.scheduler.state_dict(), "step": self.step, "epoch": self.epoch,
                   "batch_in_epoch": self.batch_in_epoch, "rng": rngs, "config": self.config,
                   "world_size": s.size, "strategy": s.name, "precision": s.precision.state_dict()}
        assert payload.keys() == SCHEMA.keys(), sorted(payload.keys() ^ SCHEMA.keys())
        return payload

    def load_state_dict(self, payload: dict[str, Any]) -> Optional[str]:
        """Restore from a validated payload (every training rank, the same payload). Returns a
        note for the user when something could not be restored exactly, else None."""
        s = self.strategy
        if payload["strategy"] != s.name and "ps" in (payload["strategy"], s.name):
            # Horovod and DDP checkpoints are interchangeable; a parameter server's is not
            raise ConfigError(f"checkpoint: written by strategy={payload['strategy']}, this run is "
                              f"strategy={s.name}: set checkpoint.resume=never or another run_dir")
        s.load_state_dict(self.model, self.optimizer, payload)
        self.scheduler.load_state_dict(payload["scheduler"])
        s.precision.load_state_dict(payload["precision"])
        self.step, self.epoch, self.batch_in_epoch = (int(payload[k]) for k in ("step", "epoch", "batch_in_epoch"))
        if len(payload["rng"]) == s.dp_size:
            rng.restore(payload["rng"][s.dp_rank])
            return None
        return (f"the checkpoint has {len(payload['rng'])} ranks' random streams, this run {s.dp_size}: "
                f"random streams restart (weights and position are exact)")
