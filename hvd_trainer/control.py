"""The job's control plane: peers that are lost, and signals that ask the job to stop.

Two guarantees, the same for every strategy, and independent of the collectives that train:

1. **A lost rank never hangs the job.** A rank killed (``kill -9``), stopped (``SIGSTOP``) or on
   a node that went down answers nothing, and its peers would wait in their next collective
   forever (Horovod, gloo). Each rank runs a heartbeat thread on its own duplicate of
   ``COMM_WORLD``: it sends a heartbeat to the next rank of a ring every ``interval`` and
   watches the previous one. A predecessor silent for ``runtime.peer_timeout_s`` is named (rank
   and host) and the job is aborted. The heartbeats come from a thread, so a long step, an
   evaluation or a checkpoint write does not count as silence; a stopped process's thread stops
   with it.
2. **A signal stops every rank at the same step.** SIGUSR1 or SIGTERM (SLURM's warning before the
   time limit, a preemption, ``scancel``) may reach some ranks and not others, at any moment. The
   signal only sets a flag. The rank's thread tells rank 0, which asks every training rank for
   its step; each rank holds at its next step boundary until rank 0's answer arrives: stop at
   ``S = max(steps) + 1``. ``S`` is at or after every rank's current step, so every training
   rank stops at ``S``, writes one checkpoint together and exits with :data:`EXIT_PREEMPTED`.
   No collective of training is involved, so parameter-server workers, which do not run in
   lockstep, agree as well.

Without an MPI launcher (one process, ``horovodrun --gloo``, ``torchrun``) there is no side
channel: the heartbeat is left to the launcher and the library's own timeouts, and the stop is
agreed through one small ``allreduce`` of the strategy at every step boundary.

Who calls what: :func:`open_control_plane` is called by every rank of the job (it is
collective: it duplicates the communicator and gathers every rank's host); ``step_boundary`` by
every training rank after every optimizer step; ``close`` by every rank once, after the
strategy's shutdown.
"""
from __future__ import annotations

import signal
import socket
import sys
import threading
import time
from typing import Callable, Optional, Sequence

import numpy as np

from .launch_env import abort_job, launched_by_mpi

from .errors import EXIT_PREEMPTED  # noqa: F401 - re-exported: what a stop exits with

TAG_HEARTBEAT = 11  # ring successor: I am alive (payload: my step)
TAG_BYE = 12        # ring successor: I am done; stop watching me
TAG_STOP = 13       # -> rank 0: a signal arrived here
TAG_QUERY = 14      # rank 0 -> training ranks: your step?
TAG_REPLY = 15      # training rank -> rank 0: my step (and I hold at my next boundary)
TAG_DECIDE = 16     # rank 0 -> training ranks: stop at this step
TAG_PING = 17       # any -> any: are you alive? (a census after a failure)
TAG_PONG = 18       # the answer


class StopSignals:
    """Catches the stop signals in the main thread: the handler only records the first one."""

    def __init__(self, names: Sequence[str]) -> None:
        self.received: Optional[str] = None
        self._previous = {}
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread (an embedding app's job)
        for name in names:
            sig = getattr(signal, f"SIG{name}")
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.received is None:
            self.received = signal.Signals(signum).name
            print(f"hvd-train: {self.received} received: stopping at the next step boundary, "
                  f"with a checkpoint", file=sys.stderr, flush=True)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


class ControlPlane:
    """Base: a single process (no peers to lose; a signal stops it at the next step)."""

    def __init__(self, signals: StopSignals) -> None:
        self.signals = signals
        self.stop_step: Optional[int] = None

    def step_boundary(self, step: int) -> bool:
        """Every training rank, after each optimizer step (``step`` = steps done so far): whether
        to stop here. The answer is the same on every training rank at the same step."""
        return self.signals.received is not None

    @property
    def reason(self) -> str:
        return self.signals.received or "a stop request"

    def close(self) -> None:
        self.signals.restore()


class CollectiveVote(ControlPlane):
    """No side channel (not launched by MPI): one small allreduce per step boundary."""

    def __init__(self, signals: StopSignals, allreduce: Callable) -> None:
        super().__init__(signals)
        self.allreduce = allreduce

    def step_boundary(self, step: int) -> bool:
        import torch

        flag = torch.tensor([1.0 if self.signals.received else 0.0], dtype=torch.float64)
        return bool(float(self.allreduce(flag)[0]) > 0)


class MPIControlPlane(ControlPlane):
    """Heartbeats and stop agreement over a duplicate of ``COMM_WORLD``, run by a thread."""

    def __init__(self, signals: StopSignals, timeout_s: float, is_training: bool) -> None:
        super().__init__(signals)
        from mpi4py import MPI

        self.MPI = MPI
        self.comm = MPI.COMM_WORLD.Dup()
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        info = self.comm.allgather((socket.gethostname(), bool(is_training)))  # collective
        self.hosts = [h for h, _ in info]
        self.training = [r for r, (_, t) in enumerate(info) if t]
        self.timeout = float(timeout_s)
        self.interval = min(2.0, max(0.1, self.timeout / 10)) if self.timeout > 0 else 1.0
        self.pred, self.succ = (self.rank - 1) % self.size, (self.rank + 1) % self.size
        self.step = 0          # this rank's steps done (written by the main thread)
        self.hold_after: Optional[int] = None  # replied this step to a query: wait at the next boundary
        self._decided = threading.Event()
        self._replies: dict[int, int] = {}
        self._asked = False     # rank 0: a query round is under way
        self._told = False      # this rank told rank 0 of its signal
        self._outbox: list = []
        self._queue: list = []  # (dest, tag, value) for the thread to send
        self._last_heard = time.monotonic()
        self._pred_done = self.size == 1
        self._origin: Optional[str] = None  # rank 0: where the stop signal came from
        self._census: Optional[set] = None  # ranks that answered the census so far
        self._census_done = threading.Event()
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._run, name="hvd-trainer-control", daemon=True)
        self._thread.start()

    # --- the main thread ------------------------------------------------------------------------------
    def step_boundary(self, step: int) -> bool:
        self.step = step
        hold = self.hold_after
        if hold is not None and step > hold and not self._decided.is_set():
            self._decided.wait()  # rank 0 answers within a few polls; a lost rank 0 aborts the job
        return self.stop_step is not None and step >= self.stop_step

    def describe(self, rank: int) -> str:
        return f"rank {rank} on host {self.hosts[rank]}"

    @property
    def reason(self) -> str:
        return self.signals.received or self._origin or "a stop signal on another rank"

    def census(self, wait_s: float = 3.0) -> list[int]:
        """After a failure on this rank: the ranks that do not answer within ``wait_s`` (killed,
        stopped, or on a node that is down), so the failure can be blamed on its cause."""
        self._census = {self.rank}
        self._census_done.clear()
        for r in range(self.size):
            if r != self.rank:
                self._queue.append((r, TAG_PING, 0))
        self._census_done.wait(wait_s)
        return sorted(set(range(self.size)) - self._census)

    # --- the thread -------------------------------------------------------------------------------------
    def _send(self, dest: int, tag: int, value: int = 0) -> None:  # the thread only
        if dest == self.rank:
            self._handle(self.rank, tag, value)
            return
        buf = np.array([value], dtype=np.int64)
        self._outbox.append((self.comm.Isend(buf, dest=dest, tag=tag), buf))

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException:  # noqa: BLE001 - without this thread nothing watches: end the job
            import traceback

            print(f"hvd-train: {self.describe(self.rank)}: the control thread failed:", file=sys.stderr)
            traceback.print_exc()
            sys.stderr.flush()
            abort_job(1)

    def _loop(self) -> None:
        status = self.MPI.Status()
        buf = np.zeros(1, dtype=np.int64)
        next_beat = 0.0
        last_loop = time.monotonic()
        while not self._closing.is_set():
            now = time.monotonic()
            if now - last_loop > max(1.0, self.timeout / 2):
                self._last_heard = now  # this process was stopped or starved itself: blame no one
            last_loop = now
            while self._queue:
                self._send(*self._queue.pop(0))
            if now >= next_beat and self.size > 1:
                self._send(self.succ, TAG_HEARTBEAT, self.step)
                next_beat = now + self.interval
            while self.comm.Iprobe(source=self.MPI.ANY_SOURCE, tag=self.MPI.ANY_TAG, status=status):
                source, tag = status.Get_source(), status.Get_tag()
                self.comm.Recv(buf, source=source, tag=tag)
                self._handle(source, tag, int(buf[0]))
            if self.signals.received and not self._told:  # a server forwards it too
                self._told = True
                self._send(0, TAG_STOP, getattr(signal, self.signals.received))
            self._outbox = [(r, b) for r, b in self._outbox if not r.Test()]
            self._check_pred()
            # poll fast while a stop is being agreed (the ranks hold for it), else at the beat
            busy = self._asked or (self.hold_after is not None and not self._decided.is_set())
            self._closing.wait(0.01 if busy else min(0.05, self.interval))

    def _handle(self, source: int, tag: int, value: int) -> None:
        if tag == TAG_HEARTBEAT and source == self.pred:
            self._last_heard = time.monotonic()
        elif tag == TAG_BYE and source == self.pred:
            self._pred_done = True
        elif tag == TAG_STOP and self.rank == 0 and not self._asked and not self._decided.is_set():
            self._asked = True
            self._origin = f"{signal.Signals(value).name} on {self.describe(source)}"
            for r in self.training:
                self._send(r, TAG_QUERY)
        elif tag == TAG_QUERY:
            self.hold_after = self.step  # set before the step is read: see step_boundary
            self._send(0, TAG_REPLY, self.hold_after)
        elif tag == TAG_REPLY and self.rank == 0:
            self._replies[source] = value
            if len(self._replies) == len(self.training):
                self._asked = False
                stop = max(self._replies.values()) + 1
                for r in self.training:
                    self._send(r, TAG_DECIDE, stop)
        elif tag == TAG_DECIDE:
            self.stop_step = value
            self._decided.set()
        elif tag == TAG_PING:
            self._send(source, TAG_PONG)
        elif tag == TAG_PONG and self._census is not None:
            self._census.add(source)
            if len(self._census) == self.size:
                self._census_done.set()
        self._last_heard = time.monotonic() if source == self.pred else self._last_heard

    def _check_pred(self) -> None:
        if self._pred_done or self.timeout <= 0:
            return
        silent = time.monotonic() - self._last_heard
        if silent > self.timeout:
            print(f"hvd-train: {self.describe(self.rank)}: lost {self.describe(self.pred)}: no "
                  f"heartbeat for {silent:.0f} s (killed, stopped, or its node is down; "
                  f"runtime.peer_timeout_s={self.timeout:g}); ending the job", file=sys.stderr, flush=True)
            abort_job(1)

    # --- the end ------------------------------------------------------------------------------------------
    def close(self) -> None:
        """Every rank, once, after the strategy's shutdown: say goodbye to the successor, hear the
        predecessor's goodbye (it may still be finishing; at most the peer timeout), then free the
        communicator."""
        super().close()
        self._closing.set()
        self._thread.join()
        if self.size > 1:
            self._send(self.succ, TAG_BYE)
        status, buf = self.MPI.Status(), np.zeros(1, dtype=np.int64)
        deadline = time.monotonic() + (self.timeout if self.timeout > 0 else 60.0)
        while not self._pred_done and time.monotonic() < deadline:  # training is over: never abort here
            if self.comm.Iprobe(source=self.MPI.ANY_SOURCE, tag=self.MPI.ANY_TAG, status=status):
                self.comm.Recv(buf, source=status.Get_source(), tag=status.Get_tag())
                self._handle(status.Get_source(), status.Get_tag(), int(buf[0]))
            else:
                time.sleep(0.01)
        self.MPI.Request.Waitall([r for r, _ in self._outbox])
        self.comm.Free()


def open_control_plane(*, size: int, is_training: bool, peer_timeout_s: float,
                       stop_signals: Sequence[str], allreduce: Callable) -> ControlPlane:
    """Every rank of the job calls this once, after the strategy is up (collective under MPI)."""
    signals = StopSignals(stop_signals)
    if size > 1 and launched_by_mpi():
        return MPIControlPlane(signals, peer_timeout_s, is_training)
    if size > 1:
        return CollectiveVote(signals, allreduce)
    return ControlPlane(signals)
