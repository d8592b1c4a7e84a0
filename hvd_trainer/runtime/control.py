"""The job's control plane: peers that are lost, and signals that ask the job to stop.

Two guarantees, the same for every strategy, and independent of the collectives that train:

1. **A lost rank never hangs the job.** A rank killed (``kill -9``), stopped (``SIGSTOP``) or on
   a node that went down answers nothing, and its peers would wait in their next collective
   forever (Horovod, gloo). Each rank beats the next rank of a ring and watches the previous one;
   a predecessor silent for ``runtime.peer_timeout_s`` is named ("lost rank R on host H") and the
   job is aborted. The beats come from a thread, so a long step, an evaluation or a checkpoint
   write is not silence; a stopped process's thread stops with it.
2. **A signal stops every rank at the same step.** SIGUSR1 or SIGTERM (SLURM's warning before the
   time limit, a preemption, ``scancel``) may reach some ranks and not others, at any moment. The
   signal only sets a flag; rank 0 then asks every training rank its step, each holds at its next
   step boundary for the answer, ``S = max(steps) + 1``, and every training rank stops at ``S``,
   writes one checkpoint together and exits with :data:`EXIT_PREEMPTED`. No collective of
   training is involved, so parameter-server workers, which do not run in lockstep, agree too.

The protocols themselves (heartbeat, stop agreement, census) are plain state machines in
:mod:`.protocols`; :class:`MPIControlPlane` is their transport: a thread on a duplicate of
``COMM_WORLD`` that sends what they return and routes what arrives to them.

Without an MPI launcher (one process, ``horovodrun --gloo``, ``torchrun``) there is no side
channel: the heartbeat is left to the launcher and the library's own timeouts, and the stop is
agreed through one small ``allreduce`` of the strategy at every step boundary.

Who calls what: :func:`open_control_plane` is called by every rank of the job (it is
collective: it duplicates the communicator and gathers every rank's host); ``step_boundary`` by
every training rank after every optimizer step; ``close`` by every rank once, after the
strategy's shutdown; ``census``/``lost_peers_message`` by any one rank after a failure.
"""
from __future__ import annotations

import signal
import socket
import sys
import threading
import time
from typing import Callable, Optional, Sequence

import numpy as np

from .errors import EXIT_PREEMPTED  # noqa: F401 - re-exported: what a stop exits with
from . import world
from .launch_env import abort_job, launched_by_mpi
from .protocols import Message, Node


class StopSignals:
    """Catches the stop signals in the main thread: the handler only records the first one."""

    def __init__(self, names: Sequence[str]) -> None:
        self.received: Optional[str] = None
        self._previous = {}
        # the catcher of an enclosing loop (hvd-tune's, around a trial): a stop it caught before
        # this one was set counts here, and one caught here counts there
        self.outer: Optional[StopSignals] = None
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread (an embedding app's job)
        for name in names:
            sig = getattr(signal, f"SIG{name}")
            self._previous[sig] = signal.signal(sig, self._handle)
            owner = getattr(self._previous[sig], "__self__", None)
            if isinstance(owner, StopSignals):
                self.outer = owner
        if self.outer is not None:
            self.received = self.outer.received

    def _handle(self, signum, frame) -> None:
        if self.outer is not None and self.outer.received is None:
            self.outer.received = signal.Signals(signum).name
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

    def step_boundary(self, step: int) -> bool:
        """Every training rank, after each optimizer step (``step`` = steps done so far): whether
        to stop here. The answer is the same on every training rank at the same step."""
        return self.signals.received is not None

    @property
    def reason(self) -> str:
        return self.signals.received or "a stop request"

    def describe(self, rank: int) -> str:
        return f"rank {rank}"

    def census(self, wait_s: float = 3.0) -> list[int]:
        """After a failure on this rank: the ranks that do not answer within ``wait_s``. Without
        a side channel nothing can be asked: none."""
        return []

    def lost_peers_message(self, rank: int, wait_s: float = 3.0) -> Optional[str]:
        """After a failure on rank ``rank`` (this one): a line naming the peers that no longer
        answer (killed, stopped, or on a node that is down), so the failure is blamed on its
        cause; ``None`` if all answer or none can be asked. Blocks up to ``wait_s``."""
        lost = self.census(wait_s)
        if not lost:
            return None
        return (f"{self.describe(rank)}: {', '.join(self.describe(r) for r in lost)} does not answer "
                f"(killed, stopped, or its node is down); ending the job")

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
        return bool(float(self.allreduce(flag, op="sum")[0]) > 0)  # any rank's signal counts


class MPIControlPlane(ControlPlane):
    """The transport of :class:`~.protocols.Node` over a duplicate of the run's communicator, run
    by a thread. Only the thread touches the communicator until :meth:`close` has joined it.
    ``who(rank)`` names a rank in its messages (default: the run's rank)."""

    def __init__(self, signals: StopSignals, timeout_s: float, is_training: bool,
                 who: Optional[Callable[[int], str]] = None) -> None:
        super().__init__(signals)
        self.who = who or world.who
        from mpi4py import MPI

        self.MPI = MPI
        self.comm = world.comm().Dup()
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        info = self.comm.allgather((socket.gethostname(), bool(is_training)))  # collective
        self.hosts = [h for h, _ in info]
        training = [r for r, (_, t) in enumerate(info) if t]
        self.node = Node(self.rank, self.size, training, timeout_s, time.monotonic())
        # one lock over the node: the main thread's step and the thread's reply to a query must
        # not interleave, or a rank could answer step s and pass boundary s+1 without holding
        self._cond = threading.Condition()
        self._queue: list[Message] = []  # from the main thread, for the thread to send
        self._outbox: list = []          # (request, buffer) of sends in flight
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._run, name="hvd-trainer-control", daemon=True)
        self._thread.start()

    # --- the main thread ------------------------------------------------------------------------
    def step_boundary(self, step: int) -> bool:
        stop = self.node.stop
        with self._cond:
            stop.reached(step)
            # rank 0 answers within a few polls; a lost rank 0 is found by the heartbeat
            self._cond.wait_for(lambda: not stop.must_hold(step))
            return stop.should_stop(step)

    def describe(self, rank: int) -> str:
        return f"{self.who(rank)} on host {self.hosts[rank]}"

    @property
    def reason(self) -> str:
        origin = self.node.stop.origin
        if self.signals.received or origin is None:
            return self.signals.received or "a stop signal on another rank"
        return f"{signal.Signals(origin[1]).name} on {self.describe(origin[0])}"

    def census(self, wait_s: float = 3.0) -> list[int]:
        census = self.node.census
        with self._cond:
            self._queue += census.start()
            self._cond.wait_for(lambda: census.complete, timeout=wait_s)
            return census.lost()

    # --- the thread -----------------------------------------------------------------------------
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
        heartbeat, stop = self.node.heartbeat, self.node.stop
        while not self._closing.is_set():
            now = time.monotonic()
            received = self.signals.received
            with self._cond:
                out, self._queue = self._queue, []
                out += self.node.poll(now, getattr(signal, received) if received else None)
            self._deliver(out, now)
            self._drain(now)
            self._outbox = [(r, b) for r, b in self._outbox if not r.Test()]
            with self._cond:
                lost, silent = heartbeat.lost(now), heartbeat.silence(now)
                busy = stop.busy
            if lost:
                print(f"hvd-train: {self.describe(self.rank)}: lost {self.describe(heartbeat.pred)}: no "
                      f"heartbeat for {silent:.0f} s (killed, stopped, or its node is down; "
                      f"runtime.peer_timeout_s={heartbeat.timeout:g}); ending the job", file=sys.stderr, flush=True)
                abort_job(1)
            # poll fast while a stop is being agreed (the ranks hold for it), else at the beat
            self._closing.wait(0.01 if busy else min(0.05, heartbeat.interval))

    def _drain(self, now: float) -> bool:
        """Route every message waiting here to the node; whether there was one."""
        status, buf, got = self.MPI.Status(), np.zeros(1, dtype=np.int64), False
        while self.comm.Iprobe(source=self.MPI.ANY_SOURCE, tag=self.MPI.ANY_TAG, status=status):
            source, tag = status.Get_source(), status.Get_tag()
            self.comm.Recv(buf, source=source, tag=tag)
            self._receive(source, tag, int(buf[0]), now)
            got = True
        return got

    def _receive(self, source: int, tag: int, value: int, now: float) -> None:
        with self._cond:
            out = self.node.receive(source, tag, value, now)
            self._cond.notify_all()  # a decision or a census answer may be what the main thread waits for
        self._deliver(out, now)

    def _deliver(self, messages: list[Message], now: float) -> None:
        for dest, tag, value in messages:
            if dest == self.rank:  # rank 0 asks and answers itself: a chain of at most four
                self._receive(self.rank, tag, value, now)
            else:
                buf = np.array([value], dtype=np.int64)
                self._outbox.append((self.comm.Isend(buf, dest=dest, tag=tag), buf))

    # --- the end --------------------------------------------------------------------------------
    def close(self) -> None:
        """Every rank, once, after the strategy's shutdown: say goodbye to the successor, hear the
        predecessor's goodbye (it may still be finishing; at most the peer timeout), then free the
        communicator."""
        super().close()
        self._closing.set()
        self._thread.join()
        heartbeat = self.node.heartbeat
        self._deliver(heartbeat.goodbye(), time.monotonic())
        deadline = time.monotonic() + (heartbeat.timeout if heartbeat.timeout > 0 else 60.0)
        while not heartbeat.pred_done and time.monotonic() < deadline:  # training is over: never abort here
            if not self._drain(time.monotonic()):  # a late query or ping is still answered
                time.sleep(0.01)
        self.MPI.Request.Waitall([r for r, _ in self._outbox])
        self.comm.Free()


def open_control_plane(*, size: int, is_training: bool, peer_timeout_s: float,
                       stop_signals: Sequence[str], allreduce: Callable) -> ControlPlane:
    """Every rank of the job calls this once, after the strategy is up (collective under MPI).
    ``allreduce(tensor, op="sum")`` is the strategy's, used only without an MPI launcher."""
    signals = StopSignals(stop_signals)
    if size > 1 and launched_by_mpi():
        return MPIControlPlane(signals, peer_timeout_s, is_training)
    if size > 1:
        return CollectiveVote(signals, allreduce)
    return ControlPlane(signals)
