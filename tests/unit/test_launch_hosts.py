"""Launch builders for runs across hosts: -H / hostfile, the TCP network, the forwarded
environment, no core binding on testbed hosts, and horovodrun's interface and ssh flags."""
from __future__ import annotations

from pathlib import Path

import pytest

from mpi_jobs.commands import FORWARD_VARS, forwarded_names, horovodrun_command, mpirun_command
from mpi_jobs.testbed import IFACE, Testbed


def _pairs(cmd: list[str], flag: str) -> list[str]:
    return [cmd[i + 1] for i, a in enumerate(cmd) if a == flag]


def _mca(cmd: list[str]) -> dict[str, str]:
    return {cmd[i + 1]: cmd[i + 2] for i, a in enumerate(cmd) if a == "--mca"}


ENV = {"PATH": "/venv/bin:/usr/bin", "LD_LIBRARY_PATH": "/opt/lib", "VIRTUAL_ENV": "/venv",
       "OMP_NUM_THREADS": "1", "HOROVOD_CYCLE_TIME": "2", "HOROVOD_STALL_CHECK_TIME_SECONDS": "30",
       "OMPI_MCA_mpi_yield_when_idle": "1", "HVD_TRAINER_TEST_SESSION": "s", "HVD_TRAINER_TEST_TAG": "t",
       "HOME": "/root", "SECRET_TOKEN": "x"}


def test_forwarded_names_are_the_ones_ranks_need_and_only_those_set():
    names = forwarded_names(ENV)
    assert names == ["PATH", "LD_LIBRARY_PATH", "VIRTUAL_ENV", "OMP_NUM_THREADS", "HVD_TRAINER_TEST_SESSION",
                     "HVD_TRAINER_TEST_TAG", "OMPI_MCA_mpi_yield_when_idle", "HOROVOD_CYCLE_TIME",
                     "HOROVOD_STALL_CHECK_TIME_SECONDS"]
    assert "HOME" not in names and "SECRET_TOKEN" not in names and "PYTHONPATH" not in names
    assert {"PATH", "PYTHONPATH", "HVD_TRAINER_TEST_TAG"} <= set(FORWARD_VARS)


def test_mpirun_across_hosts_forwards_the_environment(monkeypatch):
    for k in list(forwarded_names()):
        monkeypatch.delenv(k)
    for k, v in ENV.items():
        monkeypatch.setenv(k, v)
    cmd = mpirun_command(2, ["prog"], hosts={"node1": 1, "node2": 1}, tcp_subnet="198.18.4.0/24",
                         env={"OMP_NUM_THREADS": "2"}, export=["PATH"], allow_root=False)
    assert _pairs(cmd, "-H") == ["node1:1,node2:1"]
    assert _pairs(cmd, "-x") == ["OMP_NUM_THREADS=2", "PATH", *[n for n in forwarded_names()
                                                              if n not in ("PATH", "OMP_NUM_THREADS")]]
    assert {"HVD_TRAINER_TEST_TAG", "HOROVOD_CYCLE_TIME", "LD_LIBRARY_PATH"} <= set(_pairs(cmd, "-x"))
    mca = _mca(cmd)
    assert (mca["btl"], mca["btl_tcp_if_include"], mca["oob_tcp_if_include"]) == ("tcp,self",) + ("198.18.4.0/24",) * 2
    assert cmd[-1] == "prog"
    # one host: nothing forwarded unless asked; a hostfile counts as hosts
    assert _pairs(mpirun_command(2, ["prog"]), "-x") == []
    assert "PATH" in _pairs(mpirun_command(2, ["prog"], forward_env=True), "-x")
    with_file = mpirun_command(4, ["prog"], hostfile="/tmp/hosts")
    assert _pairs(with_file, "--hostfile") == ["/tmp/hosts"] and "PATH" in _pairs(with_file, "-x")
    assert _pairs(mpirun_command(2, ["prog"], hosts={"a": 1, "b": 1}, forward_env=False), "-x") == []


def test_horovodrun_across_hosts():
    cmd = horovodrun_command(3, ["prog", "a b"], hosts={"node1": 1, "node2": 1, "node3": 1}, gloo=True,
                             network_interfaces=["eth0"], ssh_port=2222, ssh_identity_file="/k/id",
                             start_timeout=60)
    assert cmd[:5] == ["horovodrun", "-np", "3", "-H", "node1:1,node2:1,node3:1"]
    assert _pairs(cmd, "--network-interfaces") == ["eth0"] and "--gloo" in cmd
    assert (_pairs(cmd, "-p"), _pairs(cmd, "-i"), _pairs(cmd, "--start-timeout")) == (["2222"], ["/k/id"], ["60"])
    assert cmd[-2:] == ["prog", "a b"]
    assert horovodrun_command(2, ["p"], hostfile="/h")[3:5] == ["-hostfile", "/h"]


@pytest.fixture
def planned() -> Testbed:
    tb = Testbed(hosts_count=3)
    tb.layout(7)  # names and addresses only: nothing is created
    return tb


def test_testbed_layout_names_hosts_subnet_and_namespaces(planned):
    assert [h.name for h in planned.hosts] == ["node1", "node2", "node3"]
    assert [h.address for h in planned.hosts] == ["198.18.7.1", "198.18.7.2", "198.18.7.3"]
    assert [h.netns for h in planned.hosts] == ["hvdtb7-n1", "hvdtb7-n2", "hvdtb7-n3"]
    assert planned.subnet == "198.18.7.0/24" and planned.index == -1  # planned, not claimed
    far = Testbed(hosts_count=1)
    far.layout(511)
    assert far.subnet == "198.19.255.0/24"  # the last /24 of 198.18.0.0/15


def test_testbed_launch_commands(planned):
    cmd = planned.mpirun_command(["prog"], hosts=2)
    assert cmd[:3] == ["mpirun", "-np", "2"] and _pairs(cmd, "-H") == ["node1:1,node2:1"]
    assert _pairs(cmd, "--bind-to") == ["none"]  # every host's cores are the same cores
    assert _mca(cmd)["btl_tcp_if_include"] == _mca(cmd)["oob_tcp_if_include"] == "198.18.7.0/24"
    assert "PATH" in _pairs(cmd, "-x")
    assert planned.mpirun_command(["prog"], slots=2)[:3] == ["mpirun", "-np", "6"]
    hr = planned.horovodrun_command(["prog"])
    assert hr[:5] == ["horovodrun", "-np", "3", "-H", "node1:1,node2:1,node3:1"]
    assert "--gloo" in hr and _pairs(hr, "--network-interfaces") == [IFACE]


def test_commands_on_a_host_are_argument_lists(planned):
    h = planned.hosts[1]
    cmd = planned.on_host(h, ["echo", "a b"])
    assert cmd[:4] == ["ip", "netns", "exec", "hvdtb7-n2"] and cmd[-3:] == ["node2", "echo", "a b"]
    planned.tmp = Path("/tmp/tb")
    assert planned.ssh_command(h, ["echo", "a b"]) == ["ssh", "-F", "/tmp/tb/ssh/ssh_config", "node2", "echo 'a b'"]


def test_hvd_launch_testbed_dry_run(capsys):
    from mpi_jobs.cli import main

    assert main(["--testbed", "3", "--dry-run", "--", "hvd-train", "digits"]) == 0
    err = capsys.readouterr().err
    assert "mpirun -np 3" in err and "-H node1:1,node2:1,node3:1" in err and "btl_tcp_if_include 198.18.0.0/24" in err
    assert main(["--testbed", "2", "-np", "4", "--launcher", "horovodrun", "--dry-run", "--", "x"]) == 0
    err = capsys.readouterr().err
    assert "horovodrun -np 4 -H node1:2,node2:2 --gloo --network-interfaces eth0 x" in err
    assert main(["--testbed", "2", "-np", "3", "--dry-run", "--", "x"]) == 2

