"""hvd-train under a real SLURM cluster: srun --mpi=pmix directly, and an sbatch script."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import BIN, WORKER, assert_same, mpirun, run_cmd
from running import metrics_rows
from mpi_jobs import srun_command
from mpi_jobs.slurm import BatchJob
from slurm_cluster import SlurmCluster, available

pytestmark = pytest.mark.skipif(not available(), reason="SLURM is not installed (scripts/install.sh installs it)")


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    cluster.start()
    yield cluster
    cluster.stop()


def _env(slurm) -> dict:
    return {"SLURM_CONF": str(slurm.conf), "OMPI_MCA_mpi_yield_when_idle": "1"}


def test_srun_pmix_launches_two_ranks(slurm, tmp_path):
    cmd = srun_command(2, ["hvd-train", "digits", "epochs=2", "runtime.progress=false", f"run_dir={tmp_path}"],
                       extra=["--time=5"])
    res = run_cmd(cmd, timeout=180, env=_env(slurm))
    assert res.returncode == 0, res.output + slurm.logs()
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["final_test_accuracy"] > 0.8


@pytest.mark.parametrize("launcher", ["srun", "mpirun"])
def test_sbatch_script_runs_the_trainer(slurm, tmp_path, launcher):
    job = BatchJob(program=["hvd-train", "digits", "epochs=2", "strategy=ddp", "runtime.progress=false",
                            f"run_dir={tmp_path / 'run'}"],
                   ntasks=2, time="00:05:00", output=str(tmp_path / "job.out"), launcher=launcher,
                   env={"PATH": f"{BIN}:/usr/bin:/bin", "OMPI_MCA_mpi_yield_when_idle": "1"})
    script = tmp_path / "job.sh"
    script.write_text(job.script())
    res = run_cmd(["sbatch", "--wait", str(script)], timeout=240, env=_env(slurm))
    out = (tmp_path / "job.out").read_text() if (tmp_path / "job.out").exists() else ""
    assert res.returncode == 0, res.output + out + slurm.logs()
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["strategy"] == "ddp"


def test_batch_script_is_built_from_argument_lists(tmp_path):
    job = BatchJob(program=["hvd-train", "my config.yaml", "optim.lr=0.1"], ntasks=8, nodes=2,
                   setup=[["module", "load", "openmpi"]], requeue_on_preempt=True)
    text = job.script()
    assert "#SBATCH --ntasks=8" in text and "#SBATCH --nodes=2" in text and "#SBATCH --requeue" in text
    assert "srun --ntasks=8 --mpi=pmix --cpus-per-task=1 hvd-train 'my config.yaml' optim.lr=0.1" in text
    assert subprocess.run(["bash", "-n"], input=text, text=True).returncode == 0


def _job_state(slurm, job_id: str) -> dict:
    out = subprocess.run(["scontrol", "show", "job", job_id], env=slurm.env, capture_output=True, text=True).stdout
    return dict(f.split("=", 1) for f in out.split() if "=" in f)


def test_a_warning_signal_stops_requeues_and_resumes_exactly(slurm, tmp_path):
    """SLURM's warning signal (here sent by hand: scancel --signal=USR1 --batch) reaches the
    batch shell, which forwards it to the ranks; they stop at one step with a checkpoint, exit
    75, the script requeues the job, and the requeued job resumes to weights bit-identical to a
    run that was never interrupted: no step trained twice or skipped."""
    program = [sys.executable, WORKER, "data.name=digits", "model.name=mlp", "model.hidden=[32]", "epochs=4",
               "checkpoint.every_epochs=0", "runtime.progress=false"]
    # the reference needs no pause: test.step_sleep (every step of the batch job slowed until it
    # is stopped, so the signal lands mid-run) is the test worker's, not the trainer's config,
    # and changes no arithmetic
    mpirun(2, program + [f"run_dir={tmp_path / 'whole'}"], timeout=180)
    run = tmp_path / "run"
    pause = tmp_path / "pause"  # the batch job's ranks pause at every step while it exists
    pause.touch()
    slow = ["test.step_sleep=0.02", f"test.pause_file={pause}"]
    job = BatchJob(program=program + [*slow, f"run_dir={run}"], ntasks=2, time="00:10:00", output=str(tmp_path / "job.out"),
                   env={"PATH": f"{BIN}:/usr/bin:/bin", "OMPI_MCA_mpi_yield_when_idle": "1"},
                   requeue_on_preempt=True, signal_seconds=60)
    assert "#SBATCH --signal=B:USR1@60" in job.script()
    (tmp_path / "job.sh").write_text(job.script())
    res = run_cmd(["sbatch", "--parsable", str(tmp_path / "job.sh")], timeout=60, env=_env(slurm))
    assert res.returncode == 0, res.output
    job_id = res.stdout.strip().split(";")[0]
    deadline = time.monotonic() + 120
    while metrics_rows(run) < 1:  # under way: past the first epoch
        assert time.monotonic() < deadline, _job_state(slurm, job_id)
        time.sleep(0.1)
    assert run_cmd(["scancel", "--signal=USR1", "--batch", job_id], timeout=30, env=_env(slurm)).returncode == 0
    deadline = time.monotonic() + 240
    while (state := _job_state(slurm, job_id)).get("JobState") != "COMPLETED":
        assert state.get("JobState") in ("RUNNING", "PENDING", "REQUEUED", "COMPLETING"), (state, slurm.logs())
        assert time.monotonic() < deadline, (state, slurm.logs())
        if pause.exists() and int(state.get("Restarts", 0)) >= 1:
            pause.unlink()  # stopped and requeued: the resumed run needs no pause
        # A requeued job is held (Reason=BeginTime) for the cluster's cred_expire + 1 s, 6 s here.
        # The test must not cut that short with StartTime=now: slurmd then refuses the launch
        # ("Job already killed, do not launch batch job") whenever the new credential falls in
        # the same second as the old run's revocation, and the job ends FAILED.
        time.sleep(0.5)
    out = (tmp_path / "job.out").read_text()
    assert int(state["Restarts"]) == 1, state
    assert "forwarding it to the ranks" in out and "requeueing job" in out and "exiting 75" in out, out
    stopped_at = int(out.split("stopped by SIGUSR1")[1].split("at step ")[1].split(";")[0])
    assert f"at step {stopped_at} " in out.split("requeueing job")[1]  # the requeued job resumed there
    for r in range(2):
        assert_same(torch.load(tmp_path / "whole" / f"params_rank{r}.pt", weights_only=True),
                    torch.load(run / f"params_rank{r}.pt", weights_only=True), exact=True)


def test_hvd_tune_runs_each_trial_as_its_own_srun_step(slurm, tmp_path):
    """launch=srun: hvd-tune runs in the batch shell and starts every trial as an srun step of
    ranks_per_trial tasks, two at a time in a 2-task allocation; each step records its trial,
    and a step whose trial diverges records it failed while the study goes on."""
    import optuna
    import yaml
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    study = tmp_path / "study.yaml"
    study.write_text(yaml.safe_dump({
        "name": "s", "base": "digits", "sampler": "grid", "launch": "srun", "ranks_per_trial": 1,
        "dir": str(tmp_path / "study"), "overrides": {"epochs": 2, "runtime": {"progress": False}},
        "space": {"optim.lr": {"choices": [0.01, 1e4]}, "batch_size": {"choices": [16, 64]}}}))
    job = BatchJob(program=["hvd-tune", str(study)], ntasks=2, time="00:05:00", launcher="none",
                   output=str(tmp_path / "job.out"), env={"PATH": f"{BIN}:/usr/bin:/bin", "OMPI_MCA_mpi_yield_when_idle": "1"})
    (tmp_path / "job.sh").write_text(job.script())
    res = run_cmd(["sbatch", "--wait", str(tmp_path / "job.sh")], timeout=300, env=_env(slurm))
    out = (tmp_path / "job.out").read_text() if (tmp_path / "job.out").exists() else ""
    assert res.returncode == 0, res.output + out + slurm.logs()
    storage = JournalStorage(JournalFileBackend(str(tmp_path / "study" / "journal.log")))
    trials = optuna.load_study(study_name="s", storage=storage).get_trials()
    assert sorted((t.params["optim.lr"], t.params["batch_size"]) for t in trials) == \
        [(0.01, 16), (0.01, 64), (1e4, 16), (1e4, 64)]
    for t in trials:
        assert t.state.name == ("COMPLETE" if t.params["optim.lr"] == 0.01 else "FAIL"), out
        assert t.state.name == "COMPLETE" or t.user_attrs["why"].startswith("diverged:"), t.user_attrs
        written = yaml.safe_load((Path(t.user_attrs["run_dir"]) / "config.yaml").read_text())
        assert written["optim"]["lr"] == t.params["optim.lr"]
    spans = sorted((t.datetime_start, t.datetime_complete) for t in trials)
    assert any(b[0] < a[1] for a, b in zip(spans, spans[1:])), spans  # two steps at once
    assert (tmp_path / "study" / "best.yaml").is_file() and "srun step" in out
