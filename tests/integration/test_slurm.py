"""hvd-train under a real SLURM cluster: srun --mpi=pmix directly, and an sbatch script."""
from __future__ import annotations

import json
import subprocess

import pytest

from conftest import BIN, run_cmd
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
