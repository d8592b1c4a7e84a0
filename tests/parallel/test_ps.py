"""The mpi4py parameter server under real mpirun: equivalence, consistency modes, failures."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from hvd_trainer.runtime.launch_env import usable_cores

from conftest import EQUIV_STEPS, WORKER, assert_resumed, assert_same, mpirun, summary, train_params, train_run
from running import RunningJob, metrics_rows
from mpi_jobs import mpirun_command

SGD = ["data.name=digits", "model.name=mlp", "model.hidden=[32]", "optim.name=sgd", "optim.lr=0.05",
       "optim.momentum=0.9", "optim.lr_scaling=linear", "epochs=2", "batch_size=16",
       "checkpoint.every_epochs=0", "checkpoint.resume=never"]


@pytest.fixture(scope="module")
def ring(tmp_path_factory):
    """The allreduce run with W workers, trained once per W for the module."""
    runs: dict[int, dict] = {}

    def get(workers: int) -> dict:
        if workers not in runs:
            run_dir = tmp_path_factory.mktemp(f"ring{workers}")
            runs[workers] = train_params(workers, run_dir, SGD + [f"max_steps={EQUIV_STEPS}", "strategy=horovod"])[0]
        return runs[workers]
    return get


@pytest.mark.parametrize("np,servers", [(3, 1), (4, 2), (4, 1)])
def test_sync_ps_equals_allreduce_with_the_same_workers(tmp_path, np, servers, ring):
    workers = np - servers
    short = SGD + [f"max_steps={EQUIV_STEPS}"]  # inside the rounding horizon (conftest)
    ps = train_params(np, tmp_path / "ps", short + ["strategy=ps", f"ps.num_servers={servers}"])
    ring = ring(workers)
    assert len(ps) == workers
    for replica in ps[1:]:
        assert_same(ps[0], replica, exact=True)  # every worker pulled the same parameters
    assert_same(ps[0], ring)
    s = summary(tmp_path / "ps")
    assert (s["workers"], s["servers"], s["global_batch_size"]) == (workers, servers, 16 * workers)
    steps = s["steps"]
    assert s["pushes"] == s["pulls"] == steps * workers * servers and s["dropped_gradients"] == 0
    assert s["bytes_received"] == s["bytes_sent"] == steps * workers * 4 * s["parameters"]


def test_sync_ps_resume_is_bit_identical(tmp_path):
    cfg = SGD + ["strategy=ps", "ps.num_servers=2", "epochs=3", "optim.schedule=cosine",
                 "checkpoint.every_steps=25", "checkpoint.resume=auto"]
    straight = train_params(4, tmp_path / "straight", cfg)[0]
    total = summary(tmp_path / "straight")["steps"]
    stopped = tmp_path / "stopped"
    train_params(4, stopped, cfg + ["max_steps=70"])
    assert summary(stopped)["steps"] == 70 < total  # it really stopped early
    newest = stopped / "checkpoints" / "ckpt-step000000070.pt"
    assert newest.is_file(), sorted((stopped / "checkpoints").glob("*"))
    resumed, res = train_run(4, stopped, cfg)
    assert_resumed(res.stdout, stopped, 70)  # not a fresh start that happens to match
    s = summary(stopped)
    assert s["steps"] == total
    # the servers' counts cover the resumed part only: every push of steps 71.. by 2 workers to 2 servers
    assert s["pushes"] == (total - 70) * 2 * 2, s
    assert_same(resumed[0], straight, exact=True)


@pytest.mark.parametrize("mode,np,seed", [("async", 3, 0), ("async", 4, 1), ("ssp", 3, 2), ("ssp", 4, 3)])
def test_async_and_ssp_converge(tmp_path, mode, np, seed):
    # every push is a step of its own (no averaging), on a slightly stale model: a smaller lr
    mpirun(np, ["hvd-train", "digits", "strategy=ps", f"ps.mode={mode}", "ps.staleness=2", f"seed={seed}", "optim.lr=0.02",
                "optim.lr_scaling=none", "runtime.progress=false", f"run_dir={tmp_path}"], timeout=240)
    s = summary(tmp_path)
    assert s["final_test_accuracy"] >= 0.93, s
    assert s["ps_mode"] == mode
    # the mode really ran, measured by the servers (rules.py): in sync no push is ever computed
    # ahead of another worker's clock, so a server that fell back to sync reports 0
    staleness = s["max_staleness"]
    if mode == "async":
        assert staleness > 0, f"async measured max_staleness {staleness}: it ran in lock step"
    else:
        assert 0 < staleness <= 2, f"ssp with ps.staleness=2 measured max_staleness {staleness}"


# worker 1 (the test worker's test.straggler) is 20 ms late with every gradient
STRAGGLER = [sys.executable, WORKER, "strategy=ps", "data.name=digits", "model.name=mlp", "model.hidden=[128,64]",
             "optim.lr=0.05", "optim.momentum=0.9", "epochs=2", "batch_size=16", "test.straggler=1:20",
             "runtime.progress=false", "checkpoint.every_epochs=0", "optim.lr_scaling=none"]


def test_ssp_staleness_never_exceeds_the_bound(tmp_path):
    mpirun(4, [*STRAGGLER, "ps.mode=ssp", "ps.staleness=2", f"run_dir={tmp_path / 'ssp'}"])
    mpirun(4, [*STRAGGLER, "ps.mode=async", f"run_dir={tmp_path / 'async'}"])
    ssp, free = summary(tmp_path / "ssp"), summary(tmp_path / "async")
    assert 1 <= ssp["max_staleness"] <= 2, ssp  # the straggler really held the others back
    assert free["max_staleness"] > 2, free      # without the bound the same measure sees more
    # the server mostly waits here; a busy-polling wait would use its whole core
    assert ssp["server_cpu_fraction"] < 0.5, ssp


def test_backup_workers_drop_and_count_the_stragglers_gradients(tmp_path):
    mpirun(4, [*STRAGGLER, "ps.backup_workers=1", f"run_dir={tmp_path}"])
    s = summary(tmp_path)
    assert s["dropped_gradients"] > 0, s
    assert s["pushes"] == s["steps"] * 3  # every worker's push arrived and was counted
    assert s["final_test_accuracy"] > 0.5  # two short epochs, but it learns without the drops


def test_bad_ps_config_exits_2_before_communicating(tmp_path):
    # found by the strategy's check at this world size; each check's message:
    # tests/unit/test_config.py. Here on real ranks: one line (rank 0's), exit 2, no hang
    res = mpirun(3, ["hvd-train", "digits", "strategy=ps", "ps.num_servers=3", f"run_dir={tmp_path}"],
                 timeout=60, check=False)
    assert res.returncode == 2, res.output
    lines = [line for line in res.stderr.splitlines() if line.startswith("hvd-train")]
    assert lines == ["hvd-train: config error: ps.num_servers: at most world size - 1 = 2, got 3"], res.stderr


# --- failures: the job must end on its own, naming the culprit -----------------------------------
REPORTER = str(WORKER).replace("worker.py", "exit_reporter.py")


@pytest.mark.parametrize("victim,how,culprit", [
    (1, signal.SIGKILL, "worker 1 (rank 1)"),
    (1, signal.SIGSTOP, "worker 1 (rank 1)"),
    (3, signal.SIGSTOP, "server 0 (rank 3)"),
    (3, signal.SIGKILL, "server 0 (rank 3)"),
])
def test_a_dead_or_stopped_peer_ends_the_job_with_its_name(tmp_path, victim, how, culprit):
    # A rank answers pings only while it waits; the longest stretch it computes without waiting
    # must stay well under ps.timeout_s. The longest by far is torch's import of torch._dynamo
    # inside a rank's first optimizer, at startup (1.7 s of silence seen here, 4 ranks on 2
    # cores; more than 4 s squeezed onto one core): the ranks import it before the job starts
    # (test.preimport), which leaves stretches of 0.25 s here; and no checkpoints, whose fsync
    # can stall on a busy disk. 4x that for one core.
    timeout_s = 2.0 if usable_cores() >= 2 else 8.0
    # --enable-recovery and orte_abort_on_non_zero_status=0: mpirun will NOT tear the job down
    # when a rank dies or fails; the ranks must notice and leave by themselves
    cmd = mpirun_command(4, [sys.executable, REPORTER, sys.executable, WORKER, "strategy=ps", "data.name=digits",
                             "epochs=200", "checkpoint.every_epochs=0", f"ps.timeout_s={timeout_s}",
                             "runtime.peer_timeout_s=0", "test.preimport=torch._dynamo", "runtime.progress=false",
                             f"run_dir={tmp_path}"],
                         mca={"orte_abort_on_non_zero_status": "0"}, extra=["--enable-recovery"])
    with RunningJob(cmd, program_marker="worker.py") as job:
        ranks = job.ranks(4)
        job.wait_for("training under way", lambda: metrics_rows(tmp_path) >= 1)
        os.kill(ranks[victim].pid, how)
        t0 = time.monotonic()
        others = [p for r, p in ranks.items() if r != victim]
        gone, alive = psutil.wait_procs(others, timeout=3 * timeout_s + 10)
        alive = [p for p in alive if _running(p)]  # exited, not yet reaped: gone
        elapsed = time.monotonic() - t0
    err = job.stderr
    assert not alive, (f"ranks {[r for r, p in ranks.items() if p in alive]} still running "
                       f"{3 * timeout_s + 10:.0f}s after the {how.name}\n{err[-3000:]}")
    assert culprit in err, err[-3000:]
    for r in ranks:  # every surviving rank said why it stopped, and none exited 0
        if r != victim:
            assert f"hvd-train: rank {r} " in err, err[-3000:]
            # (the reporter's own line can be lost when mpirun ends as the last rank exits)
            assert f"rank {r} exited with code 0" not in err, err[-3000:]
    assert elapsed <= 3 * timeout_s + 10


def _running(p: psutil.Process) -> bool:
    try:
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
