"""Wire protocol of the parameter server: tags, shard partitioning, and waiting without hangs.

Every wait goes through :class:`Waiter`, which (1) polls instead of blocking, sleeping between
polls so an idle rank gives its core back (Open MPI's blocking waits busy-poll); (2) answers
liveness pings from peers while it waits; (3) pings the peers it is blocked on and declares one
dead when it stays silent for ``timeout_s`` — a killed (``kill -9``) or stopped (``SIGSTOP``)
process answers nothing, while a live rank blocked on someone else still answers; (4) on a
death, tells every other rank (``TAG_ABORT``, carrying the message) and exits non-zero itself,
so the job ends even under a launcher that does not tear it down.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Callable, Iterable, Optional, Sequence

import numpy as np

TAG_ABORT = 1   # any -> any: the job is over; payload: message bytes
TAG_PING = 2    # any -> any: are you alive?
TAG_PONG = 3    # reply to a ping
TAG_CTRL = 4    # worker -> server: int64 [kind, arg]
TAG_STATE = 5   # server -> worker 0: checkpoint state or counters; worker 0 -> server: start (bytes)
TAG_DATA = 100  # + clock: gradient pushes and parameter replies

CTRL_DONE = 1
CTRL_CHECKPOINT = 2
CTRL_COUNTERS = 3
CTRL_IDLE = 4      # arg: pushes sent so far; no more until the next step
MSG_BYTES = 512
SPIN_S = 0.002  # how long a wait yields before it starts to sleep


def partition(total: int, parts: int) -> list[tuple[int, int]]:
    """Contiguous, balanced ``[lo, hi)`` ranges of a flat parameter vector (ps-lite's key
    ranges). A tensor may straddle two servers; shard sizes differ by at most one element."""
    bounds = [total * j // parts for j in range(parts + 1)]
    return [(bounds[j], bounds[j + 1]) for j in range(parts)]


class Waiter:
    """Polling waits with liveness checks. One per rank; every rank of the PS job makes one
    (it posts the receives for aborts, pings and pongs)."""

    def __init__(self, comm, timeout_s: float, describe: Callable[[int], str]) -> None:
        from mpi4py import MPI

        self.MPI, self.comm, self.timeout = MPI, comm, timeout_s
        self.describe = describe
        self.me = comm.Get_rank()
        self._abort_buf = np.zeros(MSG_BYTES, dtype=np.uint8)
        self._ping_buf = np.zeros(1, dtype=np.int64)
        self._pong_buf = np.zeros(1, dtype=np.int64)
        self._abort = comm.Irecv(self._abort_buf, source=MPI.ANY_SOURCE, tag=TAG_ABORT)
        self._ping = comm.Irecv(self._ping_buf, source=MPI.ANY_SOURCE, tag=TAG_PING)
        self._pong = comm.Irecv(self._pong_buf, source=MPI.ANY_SOURCE, tag=TAG_PONG)
        self._outbox: list = []  # small sends in flight (pongs, pings)
        self.heard: dict[int, float] = {}
        self._pinged: dict[int, float] = {}

    # -- the waits -------------------------------------------------------------------------------
    def wait_all(self, requests: Sequence, blocked_on: Iterable[int], statuses: Optional[list] = None) -> None:
        """Complete every request; ``blocked_on``: the peers whose action they need."""
        peers = set(blocked_on)
        self.reset(peers)
        delay = 0.0
        since = time.monotonic()
        while not self.MPI.Request.Testall(requests, statuses):
            delay = self._idle(peers, delay, since)

    def wait_any(self, requests: Sequence, blocked_on: Callable[[], Iterable[int]],
                 status=None) -> int:
        """Index of one completed request. ``blocked_on()`` names the peers the caller
        cannot progress without (re-evaluated while waiting)."""
        delay = 0.0
        since = time.monotonic()
        while True:
            index, done = self.MPI.Request.Testany(requests, status)
            if done and index != self.MPI.UNDEFINED:
                return index
            delay = self._idle(set(blocked_on()), delay, since)

    def send_bytes(self, dest: int, data: bytes, tag: int) -> None:
        """Send ``data`` to ``dest`` and wait until it has left (answering pings meanwhile)."""
        arr = np.frombuffer(data, dtype=np.uint8)
        self.wait_all([self.comm.Isend([arr, self.MPI.BYTE], dest=dest, tag=tag)], [dest])

    def recv_bytes(self, source: int, tag: int) -> bytes:
        """One message of any length from ``source``; declares it dead if it stays silent."""
        status = self.MPI.Status()
        self.reset([source])
        delay, since = 0.0, time.monotonic()
        while not self.comm.Iprobe(source=source, tag=tag, status=status):
            delay = self._idle({source}, delay, since)
        buf = np.empty(status.Get_count(self.MPI.BYTE), dtype=np.uint8)
        self.wait_all([self.comm.Irecv([buf, self.MPI.BYTE], source=source, tag=tag)], [source])
        return buf.tobytes()

    def heard_from(self, peer: int) -> None:
        """``peer`` just showed it is alive (a message from it arrived)."""
        self.heard[peer] = time.monotonic()

    def reset(self, peers: Iterable[int]) -> None:
        now = time.monotonic()
        for p in peers:
            self.heard[p] = now
            self._pinged.pop(p, None)

    def _idle(self, peers: set[int], delay: float, since: float) -> float:
        """One idle turn of a wait that began at ``since``; returns the next sleep."""
        self.service()
        now = time.monotonic()
        for p in peers:
            silent = now - self.heard.setdefault(p, now)
            if silent > self.timeout:
                self.fail(f"{self.describe(p)} did not answer for {silent:.1f}s (ps.timeout_s={self.timeout:g}): "
                          f"killed or stopped")
            if silent > self.timeout / 4 and now - self._pinged.get(p, 0.0) > self.timeout / 4:
                self._outbox.append(self.comm.Isend(np.zeros(1, dtype=np.int64), dest=p, tag=TAG_PING))
                self._pinged[p] = now
        # The first SPIN_S of a wait only yield the core (the answer usually comes within a step's
        # worth of work, and sleeping would add latency); after that, sleep with a growing
        # interval up to 1 ms, so a rank that really idles does not burn its core.
        if now - since < SPIN_S:
            os.sched_yield()
            return 0.0
        if delay:
            time.sleep(delay)
        return min(1e-3, max(5e-5, delay * 2))

    def service(self) -> None:
        """Answer pings, note pongs, obey aborts. Called while waiting."""
        MPI = self.MPI
        status = MPI.Status()
        if self._abort.Test(status):
            msg = bytes(self._abort_buf).rstrip(b"\0").decode(errors="replace")
            self._die(f"stopping: {msg} (reported by {self.describe(status.Get_source())})")
        while self._ping.Test(status):
            self._outbox.append(self.comm.Isend(np.zeros(1, dtype=np.int64), dest=status.Get_source(), tag=TAG_PONG))
            self._ping = self.comm.Irecv(self._ping_buf, source=MPI.ANY_SOURCE, tag=TAG_PING)
        while self._pong.Test(status):
            self.heard[status.Get_source()] = time.monotonic()
            self._pinged.pop(status.Get_source(), None)
            self._pong = self.comm.Irecv(self._pong_buf, source=MPI.ANY_SOURCE, tag=TAG_PONG)
        if len(self._outbox) > 64:
            self._outbox = [r for r in self._outbox if not r.Test()]

    # -- failure --------------------------------------------------------------------------------
    def fail(self, message: str) -> None:
        """Tell every other rank why the job ends, then exit non-zero."""
        payload = np.zeros(MSG_BYTES, dtype=np.uint8)
        raw = message.encode()[:MSG_BYTES - 1]
        payload[:len(raw)] = np.frombuffer(raw, dtype=np.uint8)
        for r in range(self.comm.Get_size()):
            if r != self.me:
                self._outbox.append(self.comm.Isend(payload, dest=r, tag=TAG_ABORT))
        time.sleep(0.5)  # let the eager sends leave; never wait on a dead peer
        self._die(message)

    def _die(self, message: str) -> None:
        print(f"hvd-train: rank {self.me} ({self.describe(self.me)}): {message}", file=sys.stderr, flush=True)
        os._exit(1)

    def close(self) -> None:
        for req in (self._abort, self._ping, self._pong):
            try:
                req.Cancel()
                req.Wait()
            except Exception:
                pass
        for req in self._outbox:
            try:
                req.Wait()
            except Exception:
                pass
