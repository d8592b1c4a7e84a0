"""The consistency rules of a parameter-server shard, without MPI: events in, actions out.

A push is a worker's gradient for the shard, carrying the worker's clock ``k``: the 1-based
number of the step it completes. The server feeds each event to a rule and carries out the
actions it returns, in order:

- :class:`Apply` — take one optimizer step on the mean of these workers' gradients, at the lr of
  step ``step_index`` (the workers' own step, 0-based; then the shard's version has advanced by
  one);
- :class:`Reply` — send worker ``w`` the shard's current parameters (its pull);
- :class:`Drop` — ``w``'s gradient was computed on parameters older than the current ones: count
  it as dropped and reply with the current parameters.

Modes:

- ``sync``: collect the pushes of step ``version + 1`` from every worker (or the first
  ``workers - backup_workers``), average, step once, reply to those workers; a late push is
  dropped (Chen et al. 2016).
- ``async``: apply every push as it arrives and reply at once (Downpour SGD).
- ``ssp``: like async, but the reply to worker w's push ``k`` is held until
  ``k - min(clock of every live worker) <= staleness`` (Ho et al. 2013), so no worker starts a
  step more than ``staleness`` steps ahead of the slowest.

Staleness is *measured* apart from the code that bounds it, from the clocks alone: a push ``k``
from w was computed by a worker ``(k - 1) - min(clock of the other live workers)`` steps ahead
of the slowest one.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Union


@dataclass(frozen=True)
class Apply:
    workers: tuple[int, ...]  # whose gradients are averaged (ascending: a fixed summation order)
    step_index: int           # 0-based optimizer step, for the lr schedule


@dataclass(frozen=True)
class Reply:
    worker: int


@dataclass(frozen=True)
class Drop:
    worker: int


Action = Union[Apply, Reply, Drop]


class Rule:
    """State one shard keeps about its workers. Subclasses decide what a push does."""

    def __init__(self, workers: Sequence[int], start_step: int = 0) -> None:
        self.workers = list(workers)
        self.version = start_step                       # optimizer steps applied to the shard
        self.clock = {w: start_step for w in workers}   # newest step each worker pushed
        self.received = {w: start_step for w in workers}  # pushes so far, per worker
        self.idle: dict[int, int] = {}                  # worker -> pushes so far, while between steps
        self.done: set[int] = set()
        self.awaiting: set[int] = set()                 # pushed, not answered yet
        self.max_staleness = 0

    # -- events ---------------------------------------------------------------------------------
    def push(self, w: int, k: int) -> list[Action]:
        self.received[w] += 1
        self.idle.pop(w, None)
        others = [self.clock[o] for o in self.workers if o != w and o not in self.done]
        if others:
            self.max_staleness = max(self.max_staleness, (k - 1) - min(others))
        self.clock[w] = max(self.clock[w], k)
        self.awaiting.add(w)
        return self._track(self._on_push(w, k))

    def went_idle(self, w: int, pushes: int) -> list[Action]:
        """w pushes nothing until its next step (it sits in a collective). Control and data
        travel separately: a notice older than the newest push received from w is stale."""
        if pushes < self.received[w]:
            return []
        self.idle[w] = pushes
        return self._track(self._on_change())

    def finished(self, w: int) -> list[Action]:
        """w has trained its last step."""
        self.done.add(w)
        self.awaiting.discard(w)
        return self._track(self._on_finished(w))

    # -- queries --------------------------------------------------------------------------------
    def holds_buffer(self, w: int) -> bool:
        """Whether w's last gradient is still needed (its receive buffer must not be reused)."""
        return False

    def blocked_on(self) -> list[int]:
        """Workers the shard waits for: live, and not waiting for an answer from it."""
        return [w for w in self.workers if w not in self.done and w not in self.awaiting]

    @property
    def all_done(self) -> bool:
        return len(self.done) == len(self.workers)

    # -- for subclasses -------------------------------------------------------------------------
    def _on_push(self, w: int, k: int) -> list[Action]:
        raise NotImplementedError

    def _on_change(self) -> list[Action]:
        return []

    def _on_finished(self, w: int) -> list[Action]:
        return self._on_change()

    def _track(self, actions: list[Action]) -> list[Action]:
        for a in actions:
            if isinstance(a, Apply):
                self.version += 1
            else:
                self.awaiting.discard(a.worker)
        return actions


class SyncRule(Rule):
    def __init__(self, workers: Sequence[int], start_step: int = 0, backup_workers: int = 0) -> None:
        super().__init__(workers, start_step)
        self.backup_workers = backup_workers
        self.accepted: list[int] = []  # workers whose push counts for the next step

    def _on_push(self, w: int, k: int) -> list[Action]:
        if k != self.version + 1:  # computed on parameters older than the current ones
            return [Drop(w)]
        self.accepted.append(w)
        return self._on_change()

    def _on_change(self) -> list[Action]:
        """Step once the first ``workers - backup_workers`` pushes of this step are in (fewer
        when workers have finished: the rest must not wait for gradients that never come)."""
        if not self.accepted:
            return []
        # A worker can be left out of this step if it has finished, or if it is idle (in a
        # collective) having already done as many steps as the workers waiting here: it will
        # not push again until they finish theirs. One idle at fewer steps is about to push.
        newest = max(self.received[a] for a in self.accepted)
        absent = sum(1 for w in self.workers if w not in self.accepted and
                     (w in self.done or self.idle.get(w, -1) >= newest))
        needed = min(len(self.workers) - self.backup_workers, len(self.workers) - absent)
        if len(self.accepted) < needed:
            return []
        group = tuple(sorted(self.accepted))
        # the lr of the step the workers are at: with backup workers the shard steps more often
        # than the schedule's steps (a straggler's late steps apply alone once the others idle),
        # and its own count would run the schedule ahead of them (cosine down to 0 too early)
        actions: list[Action] = [Apply(group, newest - 1)]
        actions += [Reply(a) for a in self.accepted]
        self.accepted = []
        return actions

    def holds_buffer(self, w: int) -> bool:
        return w in self.accepted


class AsyncRule(Rule):
    def _on_push(self, w: int, k: int) -> list[Action]:
        return [Apply((w,), k - 1), Reply(w)]


class SSPRule(Rule):
    def __init__(self, workers: Sequence[int], start_step: int = 0, staleness: int = 2) -> None:
        super().__init__(workers, start_step)
        self.staleness = staleness
        self.held: dict[int, int] = {}  # worker -> clock whose reply is held

    def _on_push(self, w: int, k: int) -> list[Action]:
        self.held[w] = k
        return [Apply((w,), k - 1), *self._release()]

    def _on_finished(self, w: int) -> list[Action]:
        self.held.pop(w, None)
        return self._release()  # a finished worker no longer holds the others back

    def _release(self) -> list[Action]:
        live = [self.clock[o] for o in self.workers if o not in self.done]
        slowest = min(live) if live else 0
        out: list[Action] = []
        for w, k in list(self.held.items()):
            if k - slowest <= self.staleness:
                del self.held[w]
                out.append(Reply(w))
        return out


def make_rule(mode: str, workers: Sequence[int], start_step: int, staleness: int, backup_workers: int) -> Rule:
    if mode == "sync":
        return SyncRule(workers, start_step, backup_workers)
    if mode == "async":
        return AsyncRule(workers, start_step)
    if mode == "ssp":
        return SSPRule(workers, start_step, staleness)
    raise ValueError(f"unknown ps.mode {mode!r}")
