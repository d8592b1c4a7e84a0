"""A stop signal (SLURM's warning before the time limit, a preemption) on any one rank: every rank
stops at the same step, one checkpoint is written, the job exits 75; the same command run again
resumes and ends bit-identical to a run that was never interrupted."""
from __future__ import annotations

import signal
import sys

import pytest
import torch

from conftest import WORKER, assert_same, mpirun, summary
from hvd_trainer.runtime.errors import EXIT_PREEMPTED
from mpi_jobs import mpirun_command
from running import RunningJob, metrics_rows

NP = {"horovod": 2, "ddp": 2, "ps": 3, "pipeline": 4, "local_sgd": 2, "fedavg": 2}
# "pipeline": 2 replicas x 2 stages, Horovod between the replicas of a stage
STRATEGY = {"pipeline": ["strategy=horovod", "parallel.pipeline_stages=2", "parallel.microbatches=2"],
            "local_sgd": ["strategy=local_sgd", "local.sync_every=4"],  # stopped mid-round, most likely
            "fedavg": ["strategy=fedavg", "fedavg.clients=16", "fedavg.fraction=0.5"]}  # 4 clients a rank a round
# 4 epochs of digits; no periodic checkpoints, so the only one before the end is the stop's
ARGS = ["data.name=digits", "model.name=mlp", "model.hidden=[32]", "epochs=4", "checkpoint.every_epochs=0",
        "runtime.progress=false"]


def _program(strategy, run_dir, slow=False):
    # slow: every step of the run to be signalled slowed by 20 ms, so the signal lands mid-run.
    # The pause is the test worker's (test.*), not the trainer's config: the runs that need no
    # pause (the reference, the resume) compute the same arithmetic without it.
    pause = ["test.step_sleep=0.02"] if slow else []
    how = STRATEGY.get(strategy, [f"strategy={strategy}"])
    return [sys.executable, WORKER, *ARGS, *pause, *how, f"run_dir={run_dir}"]


@pytest.mark.parametrize("strategy", ["horovod", "ddp", "ps", "pipeline", "local_sgd", "fedavg"])
def test_a_signal_on_one_rank_stops_all_with_one_checkpoint_and_resume_is_exact(tmp_path, strategy):
    np = NP[strategy]
    mpirun(np, _program(strategy, tmp_path / "whole"), timeout=180)
    run = tmp_path / "stopped"
    with RunningJob(mpirun_command(np, _program(strategy, run, slow=True)), program_marker="worker.py") as job:
        ranks = job.ranks(np)
        job.wait_for("a first epoch", lambda: metrics_rows(run) >= 1)
        ranks[np - 1].send_signal(signal.SIGUSR1)  # the last rank only (for ps: the server)
        code = job.wait(120)
    assert code == EXIT_PREEMPTED, f"exit {code}\n{job.output[-3000:]}"
    saved = sorted((run / "checkpoints").glob("*.pt"))
    assert len(saved) == 1, saved
    step = int(saved[0].stem.split("step")[1])
    total = summary(tmp_path / "whole")["steps"]
    assert total // 4 < step < total, (step, total)  # stopped mid-run, after the first epoch
    assert f"at step {step}" in job.stderr and "exiting 75" in job.stderr, job.stderr[-3000:]
    assert "SIGUSR1" in job.stderr

    res = mpirun(np, _program(strategy, run), timeout=180)
    assert f"resumed from {saved[0]} at step {step} " in res.stdout, res.stdout[-3000:]
    # every training rank's weights, compared (a parameter server, the last rank, holds none)
    workers = np - 1 if strategy == "ps" else np
    for d in (tmp_path / "whole", run):
        assert sorted(p.name for p in d.glob("params_rank*.pt")) == [f"params_rank{r}.pt" for r in range(workers)]
    for r in range(workers):
        assert_same(torch.load(tmp_path / "whole" / f"params_rank{r}.pt", weights_only=True),
                    torch.load(run / f"params_rank{r}.pt", weights_only=True), exact=True)


def test_sigterm_to_mpirun_writes_a_checkpoint_before_exit(tmp_path):
    with RunningJob(mpirun_command(2, _program("horovod", tmp_path, slow=True)), program_marker="worker.py") as job:
        job.ranks(2)
        job.wait_for("a first epoch", lambda: metrics_rows(tmp_path) >= 1)
        job.proc.send_signal(signal.SIGTERM)  # mpirun forwards it to every rank
        code = job.wait(60)
    assert code is not None and code != 0, job.output[-3000:]
    assert "SIGTERM" in job.stderr and "exiting 75" in job.stderr, job.stderr[-3000:]
    saved = list((tmp_path / "checkpoints").glob("*.pt"))
    assert len(saved) == 1, saved
    from hvd_trainer.checkpoint import load
    assert load(saved[0])["step"] > 0
