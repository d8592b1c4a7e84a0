"""What the launcher and the machine say, decided in one place (no torch, no MPI imported).

- which variables mean "an MPI launcher started this process", and this process's rank;
- how many cores this process may use (its CPU affinity, not the machine's core count: under
  ``taskset``, a SLURM cgroup or ``mpirun --bind-to core`` that is fewer);
- the MPI runtime settings the trainer wants before ``MPI_Init``, and torch's before its import;
- how a failing rank takes the whole job down.
"""
from __future__ import annotations

import os
from typing import MutableMapping, Optional

# Set by mpirun (Open MPI), by srun/PMIx and by MPICH-style PMI launchers.
MPI_LAUNCH_VARS = ("OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "PMI_RANK")
# Where a rank can read its own number before any communication, most specific first.
RANK_VARS = ("OMPI_COMM_WORLD_RANK", "HOROVOD_RANK", "PMIX_RANK", "PMI_RANK", "SLURM_PROCID", "RANK")

# Measured here (README "Speed", benchmarks/REPORT.md): Open MPI's blocking waits busy-poll, so a
# rank that waits in MPI (Horovod's background thread, a parameter server, a rank parked in a
# collective) takes a core from the computing ranks. Yielding when idle made Horovod at np=2
# ~1.5x faster and a 3-process parameter-server job on 2 cores ~9% faster. A value already in the
# environment wins.
MPI_RUNTIME_DEFAULTS = {"OMPI_MCA_mpi_yield_when_idle": "1"}


# Measured here (hvd-bench, collectives): MPI_Allreduce of a 16 MB torch tensor took 2.7 ms, of a
# numpy array 1.6 ms. numpy asks for transparent huge pages on large arrays, torch's allocator
# does so only with this variable set; with it, a 16 MB allreduce through Horovod took 1.8 ms
# instead of 3.3. Read once, at torch's first allocation: it must be in the environment before
# torch is imported (hvd_trainer's import sets it; a value already there wins).
TORCH_RUNTIME_DEFAULTS = {"THP_MEM_ALLOC_ENABLE": "1"}


def apply_torch_defaults(environ: Optional[MutableMapping[str, str]] = None) -> dict[str, str]:
    """Export :data:`TORCH_RUNTIME_DEFAULTS` unless set (effective only before torch's first
    allocation); returns the effective values."""
    env = os.environ if environ is None else environ
    for var, value in TORCH_RUNTIME_DEFAULTS.items():
        env.setdefault(var, value)
    return {var: env[var] for var in TORCH_RUNTIME_DEFAULTS}


def launched_by_mpi(environ: Optional[MutableMapping[str, str]] = None) -> bool:
    env = os.environ if environ is None else environ
    return any(v in env for v in MPI_LAUNCH_VARS)


def launcher_rank(environ: Optional[MutableMapping[str, str]] = None) -> int:
    """This process's rank as the launcher tells it (0 when started without one)."""
    env = os.environ if environ is None else environ
    for var in RANK_VARS:
        if var in env:
            return int(env[var])
    return 0


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def apply_mpi_defaults(environ: Optional[MutableMapping[str, str]] = None) -> dict[str, str]:
    """Export :data:`MPI_RUNTIME_DEFAULTS` unless set (call before MPI is initialised);
    returns the effective values."""
    env = os.environ if environ is None else environ
    for var, value in MPI_RUNTIME_DEFAULTS.items():
        env.setdefault(var, value)
    return {var: env[var] for var in MPI_RUNTIME_DEFAULTS}


def abort_job(code: int = 1) -> None:
    """Bring every rank of the job down after a failure on this rank (any one rank calls).

    MPI_Abort when an MPI launcher started the job and MPI is up; then exit this process at once
    (Gloo and torch.distributed peers fail on the closed connection, horovodrun and torchrun
    end the others)."""
    if launched_by_mpi():
        try:
            from mpi4py import MPI  # noqa: PLC0415 - only if it is there and initialised

            if MPI.Is_initialized() and not MPI.Is_finalized():
                MPI.COMM_WORLD.Abort(code)
        except Exception:  # noqa: BLE001 - already failing: never mask the exit
            pass
    os._exit(code)
