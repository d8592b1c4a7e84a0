"""A real single-node SLURM cluster (munged, slurmctld, slurmd) in a temp dir, for tests.

Started by the ``slurm`` fixture and torn down after; it listens on loopback ports of its own
and uses its own state, spool, log and config files (``SLURM_CONF`` points the clients at it).
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SlurmCluster:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.host = socket.gethostname().split(".")[0]
        self.procs: list[subprocess.Popen] = []
        self.conf = root / "slurm.conf"
        self.munge_socket = root / "munge.socket"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))

    def start(self, timeout: float = 60) -> None:
        r = self.root
        for d in ("state", "spool", "log", "munge"):
            (r / d).mkdir(parents=True, exist_ok=True)
        key = r / "munge" / "munge.key"
        subprocess.run(["mungekey", "-c", "-f", "-k", str(key)], check=True, capture_output=True)
        os.chmod(key, 0o600)
        self.procs.append(subprocess.Popen(
            ["munged", "-F", "--force", f"--socket={self.munge_socket}", f"--key-file={key}",
             f"--pid-file={r / 'munge' / 'munged.pid'}", f"--log-file={r / 'log' / 'munged.log'}",
             f"--seed-file={r / 'munge' / 'seed'}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        # The node's CPUs are what the tests ask for (2 tasks), not what slurmd detects: under
        # taskset or a cgroup it may see a single core, and a node with fewer CPUs than
        # configured is drained. config_overrides makes slurmd trust the configuration.
        cpus = max(2, os.cpu_count() or 1)
        mem_mb = max(1024, int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20 / 2))
        self.conf.write_text("\n".join([
            "ClusterName=hvdtest", f"SlurmctldHost={self.host}(127.0.0.1)",
            "SlurmUser=root", "SlurmdUser=root", "AuthType=auth/munge", "CredType=cred/munge",
            # cred_expire is also how long slurmctld holds a requeued job back (cred_expire + 1 s):
            # slurmd refuses a launch credential not newer than the job's revocation, so the
            # hold is what makes a requeue safe. 5 s is SLURM's minimum; 120 s its default.
            f"AuthInfo=socket={self.munge_socket},cred_expire=5",
            f"SlurmctldPort={_free_port()}", f"SlurmdPort={_free_port()}",
            f"StateSaveLocation={r / 'state'}", f"SlurmdSpoolDir={r / 'spool'}",
            f"SlurmctldPidFile={r / 'slurmctld.pid'}", f"SlurmdPidFile={r / 'slurmd.pid'}",
            f"SlurmctldLogFile={r / 'log' / 'slurmctld.log'}", f"SlurmdLogFile={r / 'log' / 'slurmd.log'}",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "JobAcctGatherType=jobacct_gather/none",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_CPU", "MpiDefault=pmix",
            "ReturnToService=2", "SchedulerType=sched/builtin",
            # the main scheduling loop (default every 60 s) starts a requeued job once its hold ends
            "SchedulerParameters=sched_interval=1", "SlurmdParameters=config_overrides",
            # sbatch --wait polls after 2, 8 and then every 32 s, unless MinJobAge (how long a
            # finished job's record stays; default 300 s) is under twice the interval: at 4 s it
            # polls every 2 s. The requeue test reads the finished job's record within 0.5 s.
            "MinJobAge=4",
            f"NodeName={self.host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={mem_mb} State=UNKNOWN",
            f"PartitionName=test Nodes={self.host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES",
        ]) + "\n")
        for daemon in (["slurmctld", "-D", "-i"], ["slurmd", "-D"]):
            self.procs.append(subprocess.Popen(daemon + ["-f", str(self.conf)], env=self.env,
                                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                               start_new_session=True))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = subprocess.run(["sinfo", "-h", "-o", "%T"], env=self.env, capture_output=True, text=True)
            if out.returncode == 0 and out.stdout.strip() in ("idle", "mixed", "allocated"):
                return
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"SLURM did not come up: {self.logs()}")

    def logs(self) -> str:
        out = []
        for name in ("slurmctld.log", "slurmd.log", "munged.log"):
            p = self.root / "log" / name
            if p.exists():
                out.append(f"--- {name}\n" + p.read_text()[-2000:])
        return "\n".join(out)

    def stop(self) -> None:
        subprocess.run(["scancel", "--user=root"], env=self.env, capture_output=True)
        for p in reversed(self.procs):
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM) if p.pid == os.getpgid(p.pid) else p.terminate()
                except ProcessLookupError:
                    continue
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
        self.procs.clear()


def available() -> bool:
    return all(shutil.which(b) for b in ("slurmctld", "slurmd", "munged", "mungekey", "srun", "sbatch"))
