"""A dead or frozen rank never hangs the job: kill -9 or SIGSTOP one rank of a training job, at a
random moment, under each strategy; the job must end non-zero within the peer timeout, with a
message that names the lost rank and its host."""
from __future__ import annotations

import random
import signal
import socket
import sys
import time

import pytest

from conftest import WORKER
from mpi_jobs import mpirun_command
from running import RunningJob, metrics_rows

PEER_TIMEOUT_S = 4.0
# detection takes the timeout plus a heartbeat interval; the rest is the launcher tearing down,
# which on a loaded 2-core machine can take seconds
DEADLINE_S = 3 * PEER_TIMEOUT_S + 15
NP = {"horovod": 2, "ddp": 3, "ps": 3}  # ps: 2 workers + 1 server


def _run_and_lose_a_rank(tmp_path, strategy: str, how: signal.Signals, rng: random.Random) -> str:
    np = NP[strategy]
    cmd = mpirun_command(np, [sys.executable, WORKER, f"strategy={strategy}", "data.name=digits", "model.name=mlp",
                              "model.hidden=[32]", "epochs=100000", "checkpoint.every_epochs=0",
                              f"runtime.peer_timeout_s={PEER_TIMEOUT_S}", "ps.timeout_s=600",
                              "runtime.progress=false", f"run_dir={tmp_path}"])
    with RunningJob(cmd, program_marker="worker.py") as job:
        ranks = job.ranks(np)
        job.wait_for("a first epoch", lambda: metrics_rows(tmp_path) >= 1)
        time.sleep(rng.uniform(0.0, 1.5))  # a random step
        victim = rng.randrange(np)
        ranks[victim].send_signal(how)
        t0 = time.monotonic()
        code = job.wait(DEADLINE_S)
        elapsed = time.monotonic() - t0
    trial = f"{how.name} of rank {victim} ({strategy}, np {np})"
    assert code is not None, f"{trial}: the job still ran {DEADLINE_S:.0f}s later\n{job.stderr[-3000:]}"
    assert code != 0, f"{trial}: exited 0\n{job.output[-3000:]}"
    # our heartbeat ("lost rank R on host H"), our census after a failed collective ("rank R on
    # host H does not answer") or mpirun's own notice of a killed rank all name rank and host
    host = socket.gethostname()
    named = (f"rank {victim} on host {host}" in job.stderr
             or f"process rank {victim} with PID" in job.stderr and f"on node {host}" in job.stderr)
    assert named, f"{trial}: no message names the lost rank and its host\n{job.stderr[-3000:]}"
    return f"{trial}: ended after {elapsed:.1f}s"


def test_a_killed_rank_ends_the_job_naming_it(tmp_path):
    rng = random.Random(20261125)
    trials = [_run_and_lose_a_rank(tmp_path / f"t{i}", strategy, signal.SIGKILL, rng)
              for i, strategy in enumerate(["horovod", "ddp", "ps"] * 3 + ["horovod"])]
    print("\n".join(trials))


@pytest.mark.parametrize("strategy", ["horovod", "ddp", "ps"])
def test_a_stopped_rank_ends_the_job_naming_it(tmp_path, strategy):
    rng = random.Random(f"stop-{strategy}")
    print(_run_and_lose_a_rank(tmp_path, strategy, signal.SIGSTOP, rng))
