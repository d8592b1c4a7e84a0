"""The control plane's protocols (heartbeat, stop agreement, census) driven without MPI or
threads: N ranks on an in-memory bus, a fake clock, messages delivered in any order."""
from __future__ import annotations

from typing import Optional

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hvd_trainer.runtime.control import CollectiveVote, ControlPlane, StopSignals
from hvd_trainer.runtime.protocols import (TAG_HEARTBEAT, TAG_QUERY, TAG_STOP, Census, Heartbeat, Node,
                                           StopAgreement)

SIGUSR1 = 10
TIMEOUT = 4.0
TICK = 0.05  # the transport's poll period


class Bus:
    """N nodes and the messages between them. A rank that is ``down`` neither polls nor
    receives (killed or stopped); what is sent to it waits, as MPI would hold it."""

    def __init__(self, n: int, training: Optional[list[int]] = None, timeout: float = TIMEOUT) -> None:
        self.now = 0.0
        training = list(range(n)) if training is None else training
        self.nodes = [Node(r, n, training, timeout, self.now) for r in range(n)]
        self.inflight: list[tuple[int, int, int, int]] = []  # (source, dest, tag, value)
        self.down: set[int] = set()
        self.sent: list[tuple[int, int, int, int]] = []

    def send(self, source: int, messages) -> None:
        for dest, tag, value in messages:
            self.inflight.append((source, dest, tag, value))
            self.sent.append((source, dest, tag, value))

    def deliverable(self) -> list[int]:
        return [i for i, m in enumerate(self.inflight) if m[1] not in self.down]

    def deliver(self, i: int) -> None:
        source, dest, tag, value = self.inflight.pop(i)
        self.send(dest, self.nodes[dest].receive(source, tag, value, self.now))

    def flush(self) -> None:
        while self.deliverable():
            self.deliver(self.deliverable()[0])

    def poll(self, rank: int, signum: Optional[int] = None) -> None:
        self.send(rank, self.nodes[rank].poll(self.now, signum))

    def tick(self) -> list[int]:
        """One poll period: every rank that runs polls and hears what arrived; the ranks that
        find their predecessor lost."""
        self.now += TICK
        for r, node in enumerate(self.nodes):
            if r not in self.down:
                self.poll(r)
        self.flush()
        return [r for r, node in enumerate(self.nodes) if r not in self.down and node.heartbeat.lost(self.now)]

    def run_until(self, t: float) -> dict[int, float]:
        """Tick until ``t``; when each rank first found its predecessor lost."""
        found: dict[int, float] = {}
        while self.now < t - 1e-9:
            for r in self.tick():
                found.setdefault(r, self.now)
        return found


# --- heartbeat ---------------------------------------------------------------------------------------
def test_a_ring_of_live_ranks_loses_no_one():
    bus = Bus(4)
    assert bus.run_until(60.0) == {}
    beats = [m for m in bus.sent if m[2] == TAG_HEARTBEAT]
    assert {(s, d) for s, d, _, _ in beats} == {(0, 1), (1, 2), (2, 3), (3, 0)}  # each to its successor


@pytest.mark.parametrize("victim", [0, 2, 3])
def test_a_silent_predecessor_is_lost_after_the_timeout_and_not_before(victim):
    bus = Bus(4)
    bus.run_until(10.0)
    last_beat = bus.nodes[(victim + 1) % 4].heartbeat.last_heard
    bus.down.add(victim)
    found = bus.run_until(30.0)
    assert list(found) == [(victim + 1) % 4]  # only its successor watches it
    assert last_beat + TIMEOUT < found[(victim + 1) % 4] <= last_beat + TIMEOUT + TICK + 1e-9


def test_a_goodbye_ends_the_watch():
    bus = Bus(3)
    bus.run_until(5.0)
    bus.send(1, bus.nodes[1].heartbeat.goodbye())
    bus.flush()
    bus.down.add(1)  # done and gone: its successor must not take the silence for a loss
    assert bus.run_until(60.0) == {}


def test_a_stopped_rank_is_named_by_its_successor_only():
    bus = Bus(3)
    bus.run_until(5.0)
    bus.down.add(2)  # SIGSTOP of rank 2: it neither polls nor reads its predecessor's beats
    found = bus.run_until(35.0)
    assert list(found) == [0]
    bus.down.discard(2)
    assert 2 not in bus.run_until(60.0)


def test_a_process_that_was_stopped_itself_blames_no_one():
    bus = Bus(3)
    bus.run_until(5.0)
    bus.down |= {0, 1, 2}  # the whole job suspended (scontrol suspend: SIGSTOP to every rank)
    bus.now += 30.0
    bus.down.discard(2)  # SIGCONT reaches rank 2 first: nothing from rank 1 for 30 s, its own fault
    found = bus.run_until(bus.now + TIMEOUT / 2)
    bus.down.clear()
    found.update(bus.run_until(bus.now + 30.0))
    assert found == {}


def test_a_starved_process_still_finds_a_predecessor_that_died_meanwhile():
    hb = Heartbeat(rank=1, size=3, timeout_s=TIMEOUT, now=0.0)
    hb.poll(20.0, step=0)  # a long gap between polls: the silence so far is not rank 0's fault
    assert not hb.lost(20.0)
    t = 20.0
    while t < 20.0 + TIMEOUT - TICK:  # polling normally again, and still nothing from rank 0
        t += TICK
        hb.poll(t, step=0)
        assert not hb.lost(t)
    hb.poll(20.0 + TIMEOUT + TICK, step=0)
    assert hb.lost(20.0 + TIMEOUT + TICK)


def test_no_timeout_means_no_watch_and_one_rank_watches_no_one():
    assert not Heartbeat(1, 3, 0.0, 0.0).lost(1e6)
    alone = Heartbeat(0, 1, TIMEOUT, 0.0)
    assert alone.poll(10.0, 0) == [] and not alone.lost(1e6) and alone.goodbye() == []


# --- stop agreement: fixed cases ---------------------------------------------------------------------
class Job:
    """A bus with training loops: a training rank is at the boundary of ``steps[r]`` steps;
    ``advance(r)`` trains one more step (unless it holds or has stopped)."""

    def __init__(self, steps: dict[int, int], size: int, lockstep: bool = False) -> None:
        self.bus = Bus(size, training=sorted(steps))
        self.steps = dict(steps)
        self.stopped: dict[int, int] = {}
        self.lockstep = lockstep
        self.signalled: dict[int, int] = {}  # rank -> its step when the signal arrived (-1: not training)
        for r, s in steps.items():
            self._boundary(r, s)

    def stop(self, r: int) -> StopAgreement:
        return self.bus.nodes[r].stop

    def _boundary(self, r: int, s: int) -> None:
        self.steps[r] = s
        self.stop(r).reached(s)
        if not self.stop(r).must_hold(s) and self.stop(r).should_stop(s):
            self.stopped[r] = s

    def held(self, r: int) -> bool:
        return self.stop(r).must_hold(self.steps[r])

    def running(self, r: int) -> bool:
        """Training step ``steps[r] + 1`` (not holding at its boundary, not stopped)."""
        return r not in self.stopped and not self.held(r)

    def can_advance(self, r: int) -> bool:
        if not self.running(r):
            return False
        if not self.lockstep:  # parameter-server workers: no collective ties the steps together
            return True
        # an allreduce of step s+1 completes once every rank is in step s+1 or past it
        s = self.steps[r]
        return all(self.steps[o] > s or (self.steps[o] == s and self.running(o)) for o in self.steps if o != r)

    def advance(self, r: int) -> None:
        self._boundary(r, self.steps[r] + 1)

    def recheck(self) -> None:
        """A held rank whose decision arrived goes on: it stops there or trains on."""
        for r, s in self.steps.items():
            if r not in self.stopped and not self.held(r) and self.stop(r).should_stop(s):
                self.stopped[r] = s

    def signal(self, r: int) -> None:
        self.signalled.setdefault(r, self.steps.get(r, -1))
        self.bus.send(r, self.stop(r).signal_seen(SIGUSR1))

    def finish(self) -> None:
        """Deliver everything and train on until every training rank has stopped."""
        for _ in range(10_000):
            self.bus.flush()
            self.recheck()
            movable = [r for r in self.steps if self.can_advance(r)]
            if not movable:
                break
            self.advance(movable[0])
        assert set(self.stopped) == set(self.steps), f"not every rank stopped: {self.stopped} {self.steps}"


@pytest.mark.parametrize("signalled", [[2], [0, 1], [0, 1, 2]])
def test_every_training_rank_stops_at_the_step_after_the_furthest(signalled):
    job = Job({0: 5, 1: 7, 2: 6}, size=3)  # parameter-server workers, at different steps
    for r in signalled:
        job.signal(r)
    job.finish()
    assert job.stopped == {0: 8, 1: 8, 2: 8}
    assert job.stop(0).origin == (signalled[0], SIGUSR1)


def test_a_rank_that_answered_holds_at_its_next_boundary_until_the_decision():
    job = Job({0: 3, 1: 3}, size=2)
    job.signal(1)
    job.bus.deliver(0)  # STOP reaches rank 0, which asks both ranks
    queries = [i for i, m in enumerate(job.bus.inflight) if m[2] == TAG_QUERY]
    job.bus.deliver(queries[0])  # rank 0 answers 3 (its reply is not read yet)
    assert not job.held(0)
    job.advance(0)  # step 4 done: the decision may be 4, so it waits here
    assert job.held(0) and not job.can_advance(0)
    job.advance(1)  # rank 1 had not been asked yet: it runs on to 4, and answers 4
    job.finish()
    assert job.stopped == {0: 5, 1: 5}


def test_a_server_forwards_the_signal_and_is_not_asked():
    job = Job({0: 4, 1: 9}, size=3)  # rank 2: a parameter server
    # the transport's poll passes the signal on (with the beat that is due), once
    assert (0, TAG_STOP, SIGUSR1) in job.bus.nodes[2].poll(0.0, SIGUSR1)
    assert job.bus.nodes[2].poll(0.0, SIGUSR1) == []
    job.bus.send(2, [(0, TAG_STOP, SIGUSR1)])
    job.finish()
    assert job.stopped == {0: 10, 1: 10}
    asked = {d for _, d, tag, _ in job.bus.sent if tag == TAG_QUERY}
    assert asked == {0, 1}
    assert job.stop(0).origin == (2, SIGUSR1)


def test_a_second_signal_during_a_round_starts_no_second_round():
    job = Job({0: 2, 1: 2, 2: 2}, size=3)
    job.signal(1)
    job.bus.deliver(0)  # the round starts
    assert job.stop(0).asking
    job.signal(2)
    job.signal(2)  # the same rank again: told once
    job.finish()
    job.signal(0)  # after the decision: nothing more
    job.bus.flush()
    assert sum(1 for m in job.bus.sent if m[2] == TAG_STOP) == 3  # ranks 1, 2, then 0
    assert sum(1 for m in job.bus.sent if m[2] == TAG_QUERY) == 3  # one round of 3 queries
    assert job.stopped == {0: 3, 1: 3, 2: 3}


# --- stop agreement: any steps, any signalled ranks, any delivery order ------------------------------
@settings(max_examples=300, deadline=None)
@given(data=st.data(), n=st.integers(1, 4), server=st.booleans(), lockstep=st.booleans())
def test_every_training_rank_decides_the_same_stop_step(data, n, server, lockstep):
    size = n + server
    server_rank = data.draw(st.integers(0, size - 1)) if server else None
    training = [r for r in range(size) if r != server_rank]
    if lockstep:  # Horovod, DDP: the ranks are at most one step apart
        base = data.draw(st.integers(0, 20))
        steps = {r: base + data.draw(st.integers(0, 1)) for r in training}
    else:
        steps = {r: data.draw(st.integers(0, 20)) for r in training}
    job = Job(steps, size, lockstep=lockstep)
    signalled = data.draw(st.lists(st.integers(0, size - 1), min_size=1, max_size=size, unique=True))
    pending_signals = list(signalled)
    replies: dict[int, int] = {}
    for _ in range(data.draw(st.integers(0, 60))):
        actions = [("signal", r) for r in pending_signals[:1]]
        actions += [("deliver", i) for i in job.bus.deliverable()]
        actions += [("advance", r) for r in training if job.can_advance(r)]
        if not actions:
            break
        kind, arg = data.draw(st.sampled_from(actions))
        if kind == "signal":
            job.signal(pending_signals.pop(0))
        elif kind == "deliver":
            _, dest, tag, _ = job.bus.inflight[arg]
            if tag == TAG_QUERY:
                replies[dest] = job.steps[dest]  # the step it answers
            job.bus.deliver(arg)
        else:
            job.advance(arg)
        job.recheck()
        # no rank ever passes the step it answered by more than one before the decision
        for r, s in replies.items():
            assert job.stop(r).stop_step is not None or job.steps[r] <= s + 1
    for r in pending_signals:
        job.signal(r)
    for _ in range(100):  # the rest in a random order too
        ready = job.bus.deliverable()
        if not ready:
            break
        i = data.draw(st.sampled_from(ready))
        if job.bus.inflight[i][2] == TAG_QUERY:
            replies[job.bus.inflight[i][1]] = job.steps[job.bus.inflight[i][1]]
        job.bus.deliver(i)
    job.finish()

    decided = max(replies.values()) + 1
    assert set(replies) == set(training)
    assert job.stopped == {r: decided for r in training}  # the same step everywhere
    assert all(job.stop(r).stop_step == decided for r in training)
    # after the signal that started the round: past the step where it arrived (a later signal
    # may find its rank already holding at the stop step)
    assert decided > job.signalled[job.stop(0).origin[0]]
    assert all(decided >= s for s in job.signalled.values())
    assert sum(1 for m in job.bus.sent if m[2] == TAG_QUERY) == len(training)  # one round


# --- census --------------------------------------------------------------------------------------------
def test_a_census_names_exactly_the_ranks_that_do_not_answer():
    bus = Bus(5)
    bus.down |= {1, 3}
    census = bus.nodes[2].census
    bus.send(2, census.start())
    bus.flush()
    assert census.lost() == [1, 3] and not census.complete
    bus.down.clear()
    bus.flush()  # late answers still count
    assert census.complete and census.lost() == []


def test_no_census_asked_loses_no_one():
    assert Census(0, 3).lost() == [] and not Census(0, 3).complete


# --- the control plane's public face, without MPI ------------------------------------------------------
def test_the_base_plane_names_no_lost_peer():
    plane = ControlPlane(StopSignals(()))
    assert plane.census() == [] and plane.lost_peers_message(0) is None
    assert plane.describe(3) == "rank 3"


def test_lost_peers_message_names_every_silent_rank():
    class Asked(ControlPlane):
        def census(self, wait_s: float = 3.0) -> list[int]:
            return [1, 4]

        def describe(self, rank: int) -> str:
            return f"rank {rank} on host h{rank}"

    msg = Asked(StopSignals(())).lost_peers_message(2)
    assert msg.startswith("rank 2 on host h2: rank 1 on host h1, rank 4 on host h4 does not answer")


@pytest.mark.parametrize("flags", [[0, 0, 0], [0, 1, 0], [1, 1, 1]])
def test_the_collective_vote_sums_the_flags(flags):
    calls = []

    def allreduce(tensor, op="average"):  # the strategy's signature: average unless told
        calls.append(op)
        total = tensor * 0 + sum(flags)
        return total if op == "sum" else total / len(flags)

    signals = StopSignals(())
    signals.received = "SIGUSR1" if flags[0] else None
    assert CollectiveVote(signals, allreduce).step_boundary(1) == any(flags)
    assert calls == ["sum"]
