"""Horovod elastic: training that survives ranks leaving and joining.

Started by ``horovodrun --gloo -np N --min-np A --max-np B --host-discovery-script SCRIPT``
(which sets ``HOROVOD_ELASTIC=1`` in every worker). The loop runs inside ``hvd.elastic.run``:

- every ``horovod.elastic_commit_steps`` steps and at every epoch end, each rank commits a copy
  of its training state in memory (and learns of hosts that were added);
- a rank that fails (its host is lost) makes the others' collectives fail: they roll back to the
  last commit, Horovod restarts communication with the ranks that are left, and training goes on;
- a host that is added interrupts the others at their next commit; the new ranks join;
- after either, rank 0's commit is broadcast to every rank (a new rank gets its whole state that
  way), the data of the current epoch not yet trained on is shared among the ranks there are now,
  and the lr is scaled for them. The summary lists every change (``membership``).

A new rank never calls a collective outside the elastic function: a checkpoint on disk is read
by rank 0 alone and reaches the others through that broadcast.
"""
from __future__ import annotations

from typing import Any

from horovod.common.elastic import State  # this module is imported only for Horovod elastic

from .base import Trainable
from .horovod import HorovodStrategy


class ElasticHorovodStrategy(HorovodStrategy):
    pipelines = False  # ranks come and go: a pipeline would lose a stage
    name = "horovod"

    def __init__(self, cfg, precision=None, executor=None) -> None:
        super().__init__(cfg, precision, executor)
        self.every = cfg.horovod.elastic_commit_steps
        self.membership: list[dict[str, int]] = []
        self._state = None

    def run(self, trainer: Trainable) -> dict[str, Any]:
        hvd = self.hvd
        trainer.restore(collective=False)
        self._state = ElasticState(hvd, trainer, self)
        self.membership.append({"step": trainer.step, "workers": self.size})
        return hvd.elastic.run(lambda state: trainer.loop())(self._state)

    def step_done(self, step: int, epoch_end: bool = False) -> None:
        if epoch_end or step % self.every == 0:
            self._state.commit()  # may raise HostsUpdatedInterrupt on every rank alike

    def after_reset(self, step: int) -> None:
        self.rank, self.size = self.hvd.rank(), self.hvd.size()
        self.local_rank, self.local_size = self.hvd.local_rank(), self.hvd.local_size()
        self.membership.append({"step": step, "workers": self.size})

    def counters(self) -> dict[str, Any]:
        return {"membership": self.membership, "elastic_commit_steps": self.every}


class ElasticState(State):
    """Horovod elastic's state object over the trainer: what a commit keeps, a rollback restores
    and a sync broadcasts."""

    def __init__(self, hvd, trainer: Trainable, strategy: ElasticHorovodStrategy) -> None:
        self.hvd, self.trainer, self.strategy = hvd, trainer, strategy
        super().__init__(bcast_object=hvd.broadcast_object, get_rank=hvd.rank)
        self.save()

    def save(self) -> None:  # a commit: this rank's copy, no communication
        self.saved = self.trainer.snapshot()

    def restore(self) -> None:  # a collective failed: back to the last commit
        self.trainer.load_snapshot(self.saved)

    def sync(self) -> None:  # every rank, after a reset: rank 0's commit and membership log
        bcast = self.hvd.broadcast_object
        self.saved = bcast(self.saved, root_rank=0, name="hvd_trainer.elastic.sync")
        self.strategy.membership[:] = bcast(self.strategy.membership, root_rank=0,
                                            name="hvd_trainer.elastic.membership")
        self.trainer.load_snapshot(self.saved)

    def reset(self) -> None:  # communication restarted with the ranks there are now
        self.strategy.after_reset(self.trainer.step)
        self.trainer.resize()
