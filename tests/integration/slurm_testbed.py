"""A real two-or-more-node SLURM cluster on the hosts testbed: slurmctld on host 1, one slurmd
per host named after it, one munged on this machine (its socket is a file, which every namespace
reaches through the shared file system).

Two things differ from the one-node cluster of ``slurm_cluster.py``, both found the hard way:
- slurmd runs under ``nsenter --net`` + ``unshare --uts`` rather than ``ip netns exec``: the latter
  remounts /sys for the namespace, hiding /sys/fs/cgroup, and slurmd 22.05 then stops ("No
  filesystem mounted on /sys/fs/cgroup"; with a fresh cgroup2 mount: "Hybrid mode is not
  supported"). Jobs' tasks therefore see this machine's /etc/hosts, not the testbed's: address
  hosts by IP (MPI's ``btl_tcp_if_include`` on the subnet does).
- ``TmpFS`` is per node (``%n``): PMIx's per-step directory lives there, and two slurmds sharing
  one /tmp collide on it ("Cannot create client cli tmpdir ... File exists").
"""
from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from typing import Optional

from mpi_jobs.testbed import Testbed


class TestbedSlurm:
    __test__ = False

    def __init__(self, tb: Testbed, root: Path, env: Optional[dict[str, str]] = None) -> None:
        self.tb, self.root = tb, root
        self.conf = root / "slurm.conf"
        self.env = dict(os.environ if env is None else env, SLURM_CONF=str(self.conf))
        self.procs: list[subprocess.Popen] = []

    def start(self, timeout: float = 60) -> None:
        r, hosts = self.root, self.tb.hosts
        for d in ("state", "log", "munge", *(f"spool/{h.name}" for h in hosts), *(f"tmp/{h.name}" for h in hosts)):
            (r / d).mkdir(parents=True, exist_ok=True)
        key, sock = r / "munge" / "munge.key", r / "munge.socket"
        subprocess.run(["mungekey", "-c", "-f", "-k", str(key)], check=True, capture_output=True)
        os.chmod(key, 0o600)
        self._spawn(["munged", "-F", "--force", f"--socket={sock}", f"--key-file={key}",
                     f"--pid-file={r / 'munge' / 'munged.pid'}", f"--log-file={r / 'log' / 'munged.log'}",
                     f"--seed-file={r / 'munge' / 'seed'}"])
        head = hosts[0]
        self.conf.write_text("\n".join([
            "ClusterName=hvdtb", f"SlurmctldHost={head.name}({head.address})", "SlurmUser=root", "SlurmdUser=root",
            "AuthType=auth/munge", "CredType=cred/munge", f"AuthInfo=socket={sock}",
            "SlurmctldPort=6817", "SlurmdPort=6818", f"StateSaveLocation={r / 'state'}",
            f"SlurmdSpoolDir={r / 'spool'}/%n", f"TmpFS={r / 'tmp'}/%n",
            f"SlurmctldPidFile={r / 'slurmctld.pid'}", f"SlurmdPidFile={r}/slurmd-%n.pid",
            f"SlurmctldLogFile={r / 'log' / 'slurmctld.log'}", f"SlurmdLogFile={r / 'log'}/slurmd-%n.log",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "JobAcctGatherType=jobacct_gather/none",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_CPU", "MpiDefault=pmix", "ReturnToService=2",
            "SchedulerType=sched/builtin", "SlurmdParameters=config_overrides",
            # sbatch --wait polls after 2, 8 and then every 32 s, unless MinJobAge (how long a
            # finished job's record stays; default 300 s) is under twice the interval: at 4 s it
            # polls every 2 s, and a job of 11 s no longer took 42 s to be seen finished
            "MinJobAge=4",
            # every "host" has this machine's cores; 2 CPUs each is what one rank per host needs
            *(f"NodeName={h.name} NodeAddr={h.address} CPUs=2 RealMemory=1000 State=UNKNOWN" for h in hosts),
            f"PartitionName=test Nodes={','.join(h.name for h in hosts)} Default=YES MaxTime=INFINITE State=UP "
            "OverSubscribe=YES",
        ]) + "\n")
        self._spawn(self.tb.on_host(head, ["slurmctld", "-D", "-i", "-f", str(self.conf)]))
        for h in hosts:  # not ip netns exec: see the module docstring
            self._spawn(["nsenter", f"--net=/run/netns/{h.netns}", "unshare", "--uts", "--", "sh", "-c",
                         'hostname "$0" && exec "$@"', h.name, "slurmd", "-D", "-N", h.name, "-f", str(self.conf)])
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            res = self.tb.run(head, ["sinfo", "-h", "-N", "-o", "%T"], env=self.env, check=False)
            if res.returncode == 0 and res.stdout.split().count("idle") == len(hosts):
                return
            time.sleep(0.5)
        raise RuntimeError(f"SLURM on the testbed did not come up:\n{self.logs()}")

    def _spawn(self, cmd: list[str]) -> None:
        self.procs.append(subprocess.Popen(cmd, env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                           start_new_session=True))

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-1500:]}"
                         for p in sorted((self.root / "log").glob("*.log")))

    def stop(self) -> None:
        self.tb.run(self.tb.hosts[0], ["scancel", "--user=root"], env=self.env, check=False)
        for p in reversed(self.procs):
            if p.poll() is None:
                p.terminate()
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.procs.clear()
