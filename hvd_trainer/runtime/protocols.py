"""The control plane's protocols without MPI or threads: events in, messages out.

Each class holds one rank's side of one protocol. The transport
(:class:`~hvd_trainer.runtime.control.MPIControlPlane`) feeds it what arrived and the time, and
sends the messages it returns, each a :data:`Message` ``(dest, tag, value)``; a message to
the rank itself is fed straight back. :class:`Node` routes one rank's inbox to the three.

- :class:`Heartbeat`: every rank beats its ring successor every ``interval`` and watches its
  predecessor; a predecessor silent for ``timeout_s`` is lost, unless it said goodbye, or unless
  this process was itself stopped or starved (then the silence is its own: blame no one).
- :class:`StopAgreement`: a signal on any rank is told to rank 0 once; rank 0 asks every training
  rank its step (one round at a time, one round per job); each replies and holds at its next step
  boundary until the answer, ``max(replies) + 1``, arrives. Every training rank stops there.
- :class:`Census`: after a failure, ping every other rank; who does not answer is lost.
"""
from __future__ import annotations

from typing import Optional, Sequence

TAG_HEARTBEAT = 11  # ring successor: I am alive (value: my step)
TAG_BYE = 12        # ring successor: I am done; stop watching me
TAG_STOP = 13       # -> rank 0: a signal arrived here (value: the signal number)
TAG_QUERY = 14      # rank 0 -> training ranks: your step?
TAG_REPLY = 15      # training rank -> rank 0: my step (and I hold at my next boundary)
TAG_DECIDE = 16     # rank 0 -> training ranks: stop at this step
TAG_PING = 17       # any -> any: are you alive? (a census after a failure)
TAG_PONG = 18       # the answer

COORDINATOR = 0  # the rank that runs the stop agreement

Message = tuple[int, int, int]  # (dest, tag, value)


class Heartbeat:
    """One rank's place in the ring: beats to its successor, watch on its predecessor."""

    def __init__(self, rank: int, size: int, timeout_s: float, now: float) -> None:
        self.rank, self.size = rank, size
        self.pred, self.succ = (rank - 1) % size, (rank + 1) % size
        self.timeout = float(timeout_s)
        # ten beats per timeout: a few late beats on a loaded machine are not a loss
        self.interval = min(2.0, max(0.1, self.timeout / 10)) if self.timeout > 0 else 1.0
        # a gap this long between two polls means this process did not run (SIGSTOP, starved)
        self.stall = max(1.0, self.timeout / 2)
        self.last_heard = now
        self.last_poll = now
        self.next_beat = now
        self.pred_done = size == 1

    def poll(self, now: float, step: int) -> list[Message]:
        """The transport, at every poll: the beat to send, if one is due."""
        if now - self.last_poll > self.stall:
            self.last_heard = now  # this process was stopped or starved itself: blame no one
        self.last_poll = now
        if self.size == 1 or now < self.next_beat:
            return []
        self.next_beat = now + self.interval
        return [(self.succ, TAG_HEARTBEAT, step)]

    def heard(self, source: int, now: float) -> None:
        """Any message from the predecessor shows it alive, not only a beat."""
        if source == self.pred:
            self.last_heard = now

    def bye(self, source: int) -> None:
        if source == self.pred:
            self.pred_done = True

    def goodbye(self) -> list[Message]:
        """This rank is done: the successor must stop watching it."""
        return [] if self.size == 1 else [(self.succ, TAG_BYE, 0)]

    def silence(self, now: float) -> float:
        return now - self.last_heard

    def lost(self, now: float) -> bool:
        """Whether the predecessor is lost (call after :meth:`poll` at the same ``now``)."""
        if self.pred_done or self.timeout <= 0:
            return False
        return self.silence(now) > self.timeout


class StopAgreement:
    """Both sides of the stop agreement: every rank is a participant, rank 0 also coordinates.

    The participant's ``step`` (steps done, from :meth:`reached`) and its answer to a query must
    be read and written atomically with respect to each other: the transport holds one lock."""

    def __init__(self, rank: int, training: Sequence[int]) -> None:
        self.rank = rank
        self.training = list(training)
        # participant
        self.step = 0
        self.told = False                       # this rank told the coordinator of its signal
        self.hold_after: Optional[int] = None   # replied this step: hold at the next boundary
        self.stop_step: Optional[int] = None
        # coordinator
        self.asking = False
        self.replies: dict[int, int] = {}
        self.decision: Optional[int] = None
        self.origin: Optional[tuple[int, int]] = None  # (rank, signal number) that started it

    # -- participant -----------------------------------------------------------------------------
    def signal_seen(self, signum: int) -> list[Message]:
        """A stop signal arrived on this rank (training or not): tell the coordinator, once."""
        if self.told:
            return []
        self.told = True
        return [(COORDINATOR, TAG_STOP, signum)]

    def reached(self, step: int) -> None:
        """The main thread, at a step boundary (``step`` = optimizer steps done)."""
        self.step = step

    def query(self) -> list[Message]:
        self.hold_after = self.step
        return [(COORDINATOR, TAG_REPLY, self.step)]

    def decide(self, stop_step: int) -> None:
        self.stop_step = stop_step

    def must_hold(self, step: int) -> bool:
        """Whether the boundary after ``step`` steps must wait for the decision: this rank told
        the coordinator an earlier step, so the decision may be this very step."""
        return self.hold_after is not None and step > self.hold_after and self.stop_step is None

    def should_stop(self, step: int) -> bool:
        return self.stop_step is not None and step >= self.stop_step

    # -- coordinator ---------------------------------------------------------------------------
    def stop_requested(self, source: int, signum: int) -> list[Message]:
        """The first request starts the one round; later ones (other ranks, the same signal) join it."""
        if self.rank != COORDINATOR or self.asking or self.decision is not None:
            return []
        self.asking = True
        self.origin = (source, signum)
        return [(r, TAG_QUERY, 0) for r in self.training]

    def replied(self, source: int, step: int) -> list[Message]:
        if self.rank != COORDINATOR or not self.asking:
            return []
        self.replies[source] = step
        if not set(self.training) <= set(self.replies):
            return []
        self.asking = False
        self.decision = max(self.replies[r] for r in self.training) + 1
        return [(r, TAG_DECIDE, self.decision) for r in self.training]

    @property
    def busy(self) -> bool:
        """A round is under way here: the transport polls fast, since training ranks hold for it."""
        return self.asking or (self.hold_after is not None and self.stop_step is None)


class Census:
    """After a failure on this rank: which ranks still answer."""

    def __init__(self, rank: int, size: int) -> None:
        self.rank, self.size = rank, size
        self.answered: Optional[set[int]] = None  # None: no census asked

    def start(self) -> list[Message]:
        self.answered = {self.rank}
        return [(r, TAG_PING, 0) for r in range(self.size) if r != self.rank]

    def pong(self, source: int) -> None:
        if self.answered is not None:
            self.answered.add(source)

    @property
    def complete(self) -> bool:
        return self.answered is not None and len(self.answered) == self.size

    def lost(self) -> list[int]:
        """The ranks that have not answered (so far)."""
        return sorted(set(range(self.size)) - (self.answered or set(range(self.size))))


class Node:
    """One rank's three protocols behind one inbox, as the transport drives them."""

    def __init__(self, rank: int, size: int, training: Sequence[int], timeout_s: float, now: float) -> None:
        self.rank = rank
        self.heartbeat = Heartbeat(rank, size, timeout_s, now)
        self.stop = StopAgreement(rank, training)
        self.census = Census(rank, size)

    def poll(self, now: float, signum: Optional[int] = None) -> list[Message]:
        """Every poll of the transport: a beat if due; ``signum`` once a stop signal was seen."""
        out = self.heartbeat.poll(now, self.stop.step)
        if signum is not None:
            out += self.stop.signal_seen(signum)
        return out

    def receive(self, source: int, tag: int, value: int, now: float) -> list[Message]:
        self.heartbeat.heard(source, now)
        if tag == TAG_BYE:
            self.heartbeat.bye(source)
        elif tag == TAG_STOP:
            return self.stop.stop_requested(source, value)
        elif tag == TAG_QUERY:
            return self.stop.query()
        elif tag == TAG_REPLY:
            return self.stop.replied(source, value)
        elif tag == TAG_DECIDE:
            self.stop.decide(value)
        elif tag == TAG_PING:
            return [(source, TAG_PONG, 0)]
        elif tag == TAG_PONG:
            self.census.pong(source)
        return []  # TAG_HEARTBEAT: heard above
