"""``sbatch --nodes=2`` on a SLURM cluster spanning two testbed hosts: one task per node, started
by ``srun --mpi=pmix`` (no mpirun), MPI traffic between the hosts; then hvd-train across them."""
from __future__ import annotations

import json
import os
import sys

import pytest

from conftest import TEST_VAR
from hosts import SKIP_REASON, run_on, start_testbed
from mpi_jobs.slurm import BatchJob
from slurm_cluster import available
from slurm_testbed import TestbedSlurm

pytestmark = [pytest.mark.skipif(SKIP_REASON is not None, reason=f"hosts testbed: {SKIP_REASON}"),
              pytest.mark.skipif(not available(), reason="SLURM is not installed (scripts/install.sh installs it)")]

CHECK = ("import socket; from mpi4py import MPI; c = MPI.COMM_WORLD; "
         "print('rank', c.rank, 'of', c.size, 'on', socket.gethostname(), 'sum', c.allreduce(c.rank + 1), flush=True)")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    tb = start_testbed(2)
    slurm = TestbedSlurm(tb, tmp_path_factory.mktemp("slurm-tb"), env={k: v for k, v in os.environ.items() if k != TEST_VAR})
    try:
        slurm.start()
        yield slurm
    finally:
        slurm.stop()
        tb.stop()


def test_sbatch_two_nodes_srun_pmix(cluster, tmp_path):
    tb = cluster.tb
    run_dir = tmp_path / "run"
    job = BatchJob(program=["hvd-train", "digits", "epochs=1", "runtime.progress=false", f"run_dir={run_dir}"],
                   ntasks=2, nodes=2, time="00:05:00", output=str(tmp_path / "job.out"),
                   setup=[["srun", "--mpi=pmix", sys.executable, "-c", CHECK]],
                   env={"PATH": f"{os.path.dirname(sys.executable)}:/usr/bin:/bin",
                        "OMPI_MCA_btl": "tcp,self", "OMPI_MCA_btl_tcp_if_include": tb.subnet,
                        "OMPI_MCA_mpi_yield_when_idle": "1", TEST_VAR: os.environ[TEST_VAR]})
    script = tmp_path / "job.sh"
    script.write_text(job.script())
    res = run_on(tb, tb.hosts[0], ["env", f"SLURM_CONF={cluster.conf}", "sbatch", "--wait", str(script)], timeout=240)
    out = (tmp_path / "job.out").read_text() if (tmp_path / "job.out").exists() else ""
    assert res.returncode == 0, res.output + out + cluster.logs()
    assert "rank 0 of 2 on node1 sum 3" in out and "rank 1 of 2 on node2 sum 3" in out, out
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["final_test_accuracy"] > 0.5
