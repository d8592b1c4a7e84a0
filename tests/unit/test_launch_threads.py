"""Ranks of a testbed share this machine's cores (every host reports all of them): the launch
gives each rank an equal share of threads, to the trainer and to OpenMP."""
from __future__ import annotations

import pytest

from mpi_jobs import commands
from mpi_jobs.commands import THREAD_VARS, share_cores


def _pairs(cmd: list[str], flag: str) -> list[str]:
    return [cmd[i + 1] for i, a in enumerate(cmd) if a == flag]


@pytest.mark.parametrize("cores,ranks,k", [(2, 2, 1), (2, 4, 1), (8, 2, 4), (8, 3, 2), (1, 1, 1), (16, 4, 4)])
def test_each_rank_gets_an_equal_share_and_at_least_one(cores, ranks, k):
    program, env = share_cores(["hvd-train", "digits"], ranks, cores=cores, environ={})
    assert program == ["hvd-train", "digits", f"runtime.threads={k}"]
    assert env == {name: str(k) for name in THREAD_VARS}


def test_only_the_trainer_gets_the_override_and_a_users_choice_wins():
    assert share_cores(["/venv/bin/hvd-train", "my.yaml"], 2, cores=8, environ={})[0][-1] == "runtime.threads=4"
    assert share_cores(["python", "-m", "hvd_trainer.cli", "digits"], 2, cores=8, environ={})[0][-1] == "runtime.threads=4"
    assert share_cores(["python", "train.py"], 2, cores=8, environ={})[0] == ["python", "train.py"]
    mine = ["hvd-train", "digits", "runtime.threads=3"]
    assert share_cores(mine, 2, cores=8, environ={})[0] == mine
    assert share_cores(["x"], 2, cores=8, environ={"OMP_NUM_THREADS": "6"})[1] == {"MKL_NUM_THREADS": "4",
                                                                               "HVD_TRAINER_THREADS": "4"}


@pytest.fixture
def two_cores(monkeypatch):
    monkeypatch.setattr(commands, "usable_cores", lambda: 2)
    for name in THREAD_VARS:
        monkeypatch.delenv(name, raising=False)


def test_hvd_launch_testbed_shares_the_cores_with_mpirun(two_cores, capsys):
    from mpi_jobs.cli import main

    assert main(["--testbed", "2", "--dry-run", "--", "hvd-train", "digits"]) == 0
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("+ mpirun -np 2 ") and line.endswith(" hvd-train digits runtime.threads=1")
    cmd = line[2:].split()
    assert {"OMP_NUM_THREADS=1", "MKL_NUM_THREADS=1"} <= set(_pairs(cmd, "-x"))
    assert "OMP_NUM_THREADS" not in _pairs(cmd, "-x")  # set, not forwarded from here


def test_hvd_launch_testbed_shares_the_cores_with_horovodrun(two_cores, capsys):
    from mpi_jobs.cli import main

    assert main(["--testbed", "2", "-np", "4", "--launcher", "horovodrun", "--dry-run", "--", "hvd-train", "x"]) == 0
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line == ("+ OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 HVD_TRAINER_THREADS=1 horovodrun -np 4 -H node1:2,node2:2 --gloo "
                    "--network-interfaces eth0 hvd-train x runtime.threads=1")


def test_without_the_testbed_nothing_is_added(two_cores, capsys):
    from mpi_jobs.cli import main

    assert main(["-np", "2", "--dry-run", "--", "hvd-train", "digits"]) == 0
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.endswith(" hvd-train digits") and "OMP_NUM_THREADS" not in line
