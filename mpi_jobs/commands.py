"""Build launcher command lines as argument lists (never shell strings).

Each builder returns ``list[str]`` ready for ``subprocess.run``; nothing is joined into or parsed
from a shell string, so paths and values with spaces or quotes pass through unharmed.
"""
from __future__ import annotations

import os
from typing import Mapping, Optional, Sequence

from hvd_trainer.runtime.launch_env import MPI_RUNTIME_DEFAULTS, usable_cores

# What a rank started on another host needs from the launcher's environment: ssh gives it a
# fresh one (PATH=/usr/bin:/bin, no venv). The interpreter and libraries, thread counts, the
# trainer's and Horovod's knobs, and the test suite's process tags (tests/conftest.py finds
# leftover ranks by them). Forwarded by name with ``-x NAME``, only when set.
FORWARD_VARS = ("PATH", "LD_LIBRARY_PATH", "PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONUNBUFFERED",
                "OMP_NUM_THREADS", "MKL_NUM_THREADS", "HVD_TRAINER_THREADS", "HVD_TRAINER_TEST_SESSION",
                "HVD_TRAINER_TEST_TAG",
                *MPI_RUNTIME_DEFAULTS)
FORWARD_PREFIXES = ("HOROVOD_", "GLOO_", "NCCL_")


def forwarded_names(environ: Optional[Mapping[str, str]] = None) -> list[str]:
    """Names from :data:`FORWARD_VARS` and :data:`FORWARD_PREFIXES` set in ``environ`` (default:
    this process's), in a stable order."""
    env = os.environ if environ is None else environ
    names = [n for n in FORWARD_VARS if n in env]
    return names + sorted(n for n in env if n.startswith(FORWARD_PREFIXES) and n not in names)


THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "HVD_TRAINER_THREADS")  # the last: the trainer's own


def share_cores(program: Sequence[str], ranks: int, *, cores: Optional[int] = None,
                environ: Optional[Mapping[str, str]] = None) -> tuple[list[str], dict[str, str]]:
    """``(program, env)`` for ``ranks`` ranks that share this machine's cores although each sees
    them all (the hosts of a testbed): each gets ``max(1, cores // ranks)`` threads.

    ``env`` sets :data:`THREAD_VARS` (a value already in ``environ`` wins). An ``hvd-train``
    program also gets ``runtime.threads=K`` unless it sets it: the trainer picks its threads from
    that, else from the cores divided by the ranks on its *host*, which here would be too many."""
    env = os.environ if environ is None else environ
    k = str(max(1, (usable_cores() if cores is None else cores) // max(1, ranks)))
    program = list(program)
    trainer = bool(program) and (os.path.basename(program[0]) == "hvd-train"
                                 or program[1:3] == ["-m", "hvd_trainer.cli"])
    if trainer and not any(a.startswith("runtime.threads=") for a in program):
        program.append(f"runtime.threads={k}")
    return program, {name: k for name in THREAD_VARS if name not in env}


def _hosts_arg(hosts: Optional[Mapping[str, int]]) -> list[str]:
    return ["-H", ",".join(f"{h}:{n}" for h, n in hosts.items())] if hosts else []


def mpirun_command(np: int, program: Sequence[str], *, hosts: Optional[Mapping[str, int]] = None,
                   env: Optional[Mapping[str, str]] = None, export: Sequence[str] = (),
                   map_by: Optional[str] = None, bind_to: Optional[str] = None,
                   oversubscribe: Optional[bool] = None, yield_when_idle: Optional[bool] = None,
                   tcp_subnet: Optional[str] = None, mca: Optional[Mapping[str, str]] = None,
                   allow_root: Optional[bool] = None, hostfile: Optional[str] = None,
                   forward_env: Optional[bool] = None, extra: Sequence[str] = ()) -> list[str]:
    """Open MPI ``mpirun``.

    - ``env``: variables set for every rank (``-x NAME=VALUE``); ``export``: names forwarded as is.
    - ``hosts`` (``-H host:slots,...``) or ``hostfile`` (``--hostfile``) place ranks on other
      hosts; then ``forward_env`` (default: on whenever hosts or a hostfile are given) adds
      ``-x NAME`` for every variable of :func:`forwarded_names` set here, after ``export``.
    - ``oversubscribe``/``yield_when_idle`` default to on when ``np`` exceeds the cores this
      process may use (its affinity: ``taskset`` or a cgroup may allow fewer than the machine
      has); then a rank blocked in MPI must yield its core rather than busy-poll. The yield
      setting is the trainer's own (:data:`hvd_trainer.runtime.launch_env.MPI_RUNTIME_DEFAULTS`).
    - ``tcp_subnet`` (e.g. ``198.18.0.0/24``) restricts both MPI traffic and the runtime's
      out-of-band channel to that network, as multi-host runs on a private fabric need.
    - ``bind_to`` defaults to Open MPI's own choice (one core per rank for np <= 2): a rank
      that stays on its core keeps its caches (benchmarks/README.md has the comparison).
    - ``allow_root`` defaults to on when running as root; ``extra``: further mpirun options.
    """
    cores = usable_cores()
    over = np > cores if oversubscribe is None else oversubscribe
    yield_idle = np > cores if yield_when_idle is None else yield_when_idle
    root = (os.geteuid() == 0) if allow_root is None else allow_root
    cmd = ["mpirun", "-np", str(np)]
    if root:
        cmd.append("--allow-run-as-root")
    if over:
        cmd.append("--oversubscribe")
    cmd += _hosts_arg(hosts)
    if hostfile:
        cmd += ["--hostfile", hostfile]
    if map_by:
        cmd += ["--map-by", map_by]
    if bind_to:
        cmd += ["--bind-to", bind_to]
    mca_all = dict(mca or {})
    if yield_idle:
        for var, value in MPI_RUNTIME_DEFAULTS.items():
            mca_all.setdefault(var[len("OMPI_MCA_"):], value)
    if tcp_subnet:
        mca_all.setdefault("btl", "tcp,self")
        mca_all.setdefault("btl_tcp_if_include", tcp_subnet)
        mca_all.setdefault("oob_tcp_if_include", tcp_subnet)
    for key, value in mca_all.items():
        cmd += ["--mca", key, str(value)]
    for name, value in (env or {}).items():
        cmd += ["-x", f"{name}={value}"]
    names = list(export)
    if forward_env if forward_env is not None else bool(hosts or hostfile):
        names += [n for n in forwarded_names() if n not in names and n not in (env or {})]
    for name in names:
        cmd += ["-x", name]
    return cmd + list(extra) + list(program)


def horovodrun_command(np: int, program: Sequence[str], *, hosts: Optional[Mapping[str, int]] = None,
                       gloo: bool = False, network_interfaces: Sequence[str] = (),
                       ssh_port: Optional[int] = None, ssh_identity_file: Optional[str] = None,
                       hostfile: Optional[str] = None, start_timeout: Optional[int] = None,
                       extra: Sequence[str] = ()) -> list[str]:
    """``horovodrun`` with the Gloo or MPI controller. Without ``hosts`` or ``hostfile`` it runs
    on localhost. Across hosts, ``network_interfaces`` must name an interface every host has
    (e.g. ``eth0``) and every hostname must resolve on every host. horovodrun forwards this
    process's environment to remote ranks itself (Gloo) or with ``-x`` (MPI)."""
    cmd = ["horovodrun", "-np", str(np)]
    cmd += ["-hostfile", hostfile] if hostfile else _hosts_arg(hosts or {"localhost": np})
    if gloo:
        cmd.append("--gloo")
    if network_interfaces:
        cmd += ["--network-interfaces", ",".join(network_interfaces)]
    if ssh_port:
        cmd += ["-p", str(ssh_port)]
    if ssh_identity_file:
        cmd += ["-i", ssh_identity_file]
    if start_timeout:
        cmd += ["--start-timeout", str(start_timeout)]
    return cmd + list(extra) + list(program)


def srun_command(ntasks: int, program: Sequence[str], *, nodes: Optional[int] = None,
                 mpi: str = "pmix", cpus_per_task: int = 1, extra: Sequence[str] = ()) -> list[str]:
    """SLURM ``srun`` starting MPI ranks directly through PMIx (no mpirun)."""
    cmd = ["srun", f"--ntasks={ntasks}", f"--mpi={mpi}", f"--cpus-per-task={cpus_per_task}"]
    if nodes:
        cmd.append(f"--nodes={nodes}")
    return cmd + list(extra) + list(program)
