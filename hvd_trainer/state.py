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
        self.batch_in_epoch = 0  # micro-batches this rank consumed in the current epoch
        self.epoch_offset = 0    # samples of the epoch trained on before the ranks last changed

    def state_dict(self) -> dict[str, Any]:
        """Collective over the training ranks (gathers their RNG streams; a parameter server's
        worker 0 collects its servers' state); every rank gets the whole payload."""
        s = self.strategy
        rngs = s.allgather_object(rng.capture())
        payload = {"format": FORMAT, **s.state_dict(self.model, self.optimizer),
                   "scheduler": self.scheduler.state_dict(), "step": self.step, "epoch": self.epoch,
                   "batch_in_epoch": self.batch_in_epoch, "epoch_offset": self.epoch_offset, "rng": rngs, "config": self.config,
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
        self.step, self.epoch, self.batch_in_epoch, self.epoch_offset = (
            int(payload[k]) for k in ("step", "epoch", "batch_in_epoch", "epoch_offset"))
        non_training = s.size - s.dp_size  # parameter servers: the same count in a run that resumes
        self.rebase(int(payload["world_size"]) - non_training, s.dp_size)
        if len(payload["rng"]) == s.dp_size:
            rng.restore(payload["rng"][s.dp_rank])
            return None
        return (f"the checkpoint has {len(payload['rng'])} ranks' random streams, this run {s.dp_size}: "
                f"random streams restart (weights and position are exact)")

    def rebase(self, old_ranks: int, new_ranks: int) -> None:
        """The position in the current epoch, for ``new_ranks`` data-parallel ranks where it was
        counted for ``old_ranks``: the samples the old ranks consumed become ``epoch_offset``, and
        the rest of the epoch is shared among the new ranks (no sample seen twice or skipped)."""
        if old_ranks == new_ranks or self.batch_in_epoch == 0:
            return
        batch = int(self.config["batch_size"])
        self.epoch_offset += self.batch_in_epoch * batch * old_ranks
        self.batch_in_epoch = 0
