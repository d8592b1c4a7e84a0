"""A dead or frozen rank never hangs the job: kill -9 or SIGSTOP one rank of a training job, at a
random moment, under each strategy; every other rank must end, non-zero, within the peer
timeout, and the control plane must name the lost rank and its host.

mpirun runs with failure recovery on (``--enable-recovery``, no abort on a rank's non-zero exit,
as in test_ps.py's dead-peer test): plain mpirun tears the job down by itself when a rank dies,
and names it, so the test would pass without the heartbeat. Here nothing but the control plane
ends the survivors, and the message required is the heartbeat's ("lost rank R on host H", from
R's ring successor). Only a killed DDP rank may be named by the census instead: the kernel resets
its gloo connections, so the survivors' collective fails before the heartbeat's timeout."""
from __future__ import annotations

import random
import signal
import socket
import sys
import time
from typing import Optional, Sequence

import pytest

from conftest import WORKER
from mpi_jobs import mpirun_command
from running import RunningJob, metrics_rows

# Short, so a trial waits little: ten beats per timeout, sent by a thread of their own, so a rank
# busy in a step or starved for a moment is not taken for lost.
PEER_TIMEOUT_S = 2.0
# A killed DDP rank is named by the survivors' census, which waits 3 s for answers: the heartbeat
# must fire later, or a census that names no one would pass unnoticed behind it.
CENSUS_PEER_TIMEOUT_S = 4.0
NP = {"horovod": 2, "ddp": 3, "ps": 3}  # ps: 2 workers + 1 server
REPORTER = str(WORKER).replace("worker.py", "exit_reporter.py")


def _run_and_lose_a_rank(tmp_path, strategy: str, how: signal.Signals, rng: random.Random,
                         victim: Optional[int] = None, extra: Sequence[str] = ()) -> str:
    np = NP[strategy]
    timeout_s = CENSUS_PEER_TIMEOUT_S if (strategy, how) == ("ddp", signal.SIGKILL) else PEER_TIMEOUT_S
    # detection takes the timeout plus a heartbeat interval, once per survivor when each one's
    # predecessor is the one that left before it; the rest is the launcher tearing down, which on
    # a loaded 2-core machine can take seconds
    deadline_s = 3 * timeout_s + 15
    cmd = mpirun_command(np, [sys.executable, REPORTER, sys.executable, WORKER, f"strategy={strategy}",
                              "data.name=digits", "model.name=mlp", "model.hidden=[32]", "epochs=100000",
                              "checkpoint.every_epochs=0", f"runtime.peer_timeout_s={timeout_s}",
                              "ps.timeout_s=600", "runtime.progress=false", f"run_dir={tmp_path}", *extra],
                         mca={"orte_abort_on_non_zero_status": "0"}, extra=["--enable-recovery"])
    with RunningJob(cmd, program_marker="worker.py") as job:
        ranks = job.ranks(np)
        job.wait_for("a first epoch", lambda: metrics_rows(tmp_path) >= 1)
        time.sleep(rng.uniform(0.0, 0.5))  # a random step: an epoch is 15-23 steps of a few ms
        victim = rng.randrange(np) if victim is None else victim
        ranks[victim].send_signal(how)
        t0 = time.monotonic()
        code = job.wait(deadline_s)
        elapsed = time.monotonic() - t0
    trial = f"{how.name} of rank {victim} ({strategy}, np {np})"
    err = job.stderr
    # mpirun ends only once every rank has: in time means every survivor ended itself
    assert code is not None, f"{trial}: the job still ran {deadline_s:.0f}s later\n{err[-3000:]}"
    for r in range(np):  # (mpirun exits 0 under recovery; the reporter's line can be lost)
        assert r == victim or f"rank {r} exited with code 0" not in err, f"{trial}: rank {r} exited 0\n{err[-3000:]}"
    host = socket.gethostname()
    heartbeat = f"rank {(victim + 1) % np} on host {host}: lost rank {victim} on host {host}: no heartbeat"
    named = heartbeat in err
    if strategy == "ddp" and how == signal.SIGKILL:
        # the survivors' collective fails at once and their census names it (3 s), before the
        # heartbeat's timeout
        named = named or f"on host {host}: rank {victim} on host {host} does not answer" in err
    # mpirun's own notice of a killed rank ("process rank R with PID ... on node H") does not count
    assert named, f"{trial}: the control plane did not name the lost rank\n{err[-3000:]}"
    return f"{trial}: ended after {elapsed:.1f}s"


@pytest.mark.parametrize("strategy", ["horovod", "ddp", "ps"])
def test_a_killed_rank_ends_the_job_naming_it(tmp_path, strategy):
    rng = random.Random(f"kill-{strategy}")
    victims = rng.sample(range(NP[strategy]), NP[strategy])  # each rank once, at a random step
    print("\n".join(_run_and_lose_a_rank(tmp_path / f"t{v}", strategy, signal.SIGKILL, rng, v) for v in victims))


@pytest.mark.parametrize("strategy", ["horovod", "ddp", "ps"])
def test_a_stopped_rank_ends_the_job_naming_it(tmp_path, strategy):
    rng = random.Random(f"stop-{strategy}")
    print(_run_and_lose_a_rank(tmp_path, strategy, signal.SIGSTOP, rng))


def test_a_stopped_pipeline_stage_ends_the_job_naming_it(tmp_path):
    # its neighbour waits in a point-to-point receive, not a collective: the heartbeat still names it
    rng = random.Random("stop-pipeline")
    print(_run_and_lose_a_rank(tmp_path, "horovod", signal.SIGSTOP, rng,
                               extra=["parallel.pipeline_stages=2", "parallel.microbatches=4"]))


def test_a_stopped_fedavg_rank_ends_the_job_naming_it(tmp_path):
    # between two rounds' means no collective runs at all: only the heartbeat can notice
    rng = random.Random("stop-fedavg")
    print(_run_and_lose_a_rank(tmp_path, "horovod", signal.SIGSTOP, rng,
                               extra=["strategy=fedavg", "fedavg.clients=8", "fedavg.local_epochs=3"]))
