"""The training state: everything an exact resume needs, in one object.

``state_dict()`` returns exactly the keys of :data:`hvd_trainer.checkpoint.SCHEMA`;
``load_state_dict()`` puts them back. ``snapshot()``/``load_snapshot()`` are the in-memory
copies Horovod elastic commits and rolls back to.
"""
from __future__ import annotations

import copy
from typing import Any, Optional

import torch
from torch import nn

from .checkpoint import FORMAT, SCHEMA
from .runtime import rng
from .strategies.base import Strategy, unwrap


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

    @property
    def position(self) -> tuple[int, int, int, int]:
        return self.step, self.epoch, self.batch_in_epoch, self.epoch_offset

    def state_dict(self) -> dict[str, Any]:
        """Collective over the training ranks (gathers their RNG streams; a parameter server's
        worker 0 collects its servers' state); every rank gets the whole payload."""
        s = self.strategy
        rngs = s.allgather_object(rng.capture())
        payload = {"format": FORMAT, **s.checkpoint_state(self.model, self.optimizer),
                   "scheduler": self.scheduler.state_dict(), "step": self.step, "epoch": self.epoch,
                   "batch_in_epoch": self.batch_in_epoch, "epoch_offset": self.epoch_offset,
                   "rng": rngs, "config": self.config, "world_size": s.size, "strategy": s.name,
                   "precision": s.precision.state_dict()}
        assert payload.keys() == SCHEMA.keys(), sorted(payload.keys() ^ SCHEMA.keys())
        return payload

    def load_state_dict(self, payload: dict[str, Any]) -> Optional[str]:
        """Restore from a validated payload (every training rank, the same payload). Returns a
        note for the user when something could not be restored exactly, else None."""
        s = self.strategy
        # replicas of the run that wrote it (a checkpoint of other pipeline stages is refused below)
        old_ranks = s.check_checkpoint(payload["strategy"], int(payload["world_size"])) // s.layout.stages
        notes = [s.load_checkpoint_state(self.model, self.optimizer, payload)]
        self.scheduler.load_state_dict(payload["scheduler"])
        s.precision.load_state_dict(payload["precision"])
        self.step, self.epoch, self.batch_in_epoch, self.epoch_offset = (
            int(payload[k]) for k in ("step", "epoch", "batch_in_epoch", "epoch_offset"))
        self.rebase(old_ranks, s.dp_size)
        if len(payload["rng"]) == s.train_size:
            rng.restore(payload["rng"][s.rank])
        else:
            notes.append(f"the checkpoint has {len(payload['rng'])} ranks' random streams, this run "
                         f"{s.train_size}: random streams restart (weights and position are exact)")
        return "; ".join(n for n in notes if n) or None

    def snapshot(self) -> dict[str, Any]:
        """This rank's state, copied (no communication): an elastic commit."""
        return copy.deepcopy({"model": unwrap(self.model).state_dict(), "optimizer": self.optimizer.state_dict(),
                              "scheduler": self.scheduler.state_dict(), "position": self.position,
                              "dp_size": self.strategy.dp_size})

    def load_snapshot(self, snap: dict[str, Any]) -> None:
        """Back to a commit (this rank's own, or rank 0's after a sync); the position is then
        re-expressed for the ranks there are now."""
        snap = copy.deepcopy(snap)
        unwrap(self.model).load_state_dict(snap["model"])
        self.optimizer.load_state_dict(snap["optimizer"])
        self.scheduler.load_state_dict(snap["scheduler"])
        self.step, self.epoch, self.batch_in_epoch, self.epoch_offset = snap["position"]
        self.rebase(snap["dp_size"], self.strategy.dp_size)

    def rebase(self, old_ranks: int, new_ranks: int) -> None:
        """The position in the current epoch, for ``new_ranks`` data-parallel ranks where it was
        counted for ``old_ranks``: the samples the old ranks consumed become ``epoch_offset``, and
        the rest of the epoch is shared among the new ranks (no sample seen twice or skipped)."""
        if old_ranks == new_ranks or self.batch_in_epoch == 0:
            return
        batch = int(self.config["batch_size"])
        self.epoch_offset += self.batch_in_epoch * batch * old_ranks
        self.batch_in_epoch = 0
