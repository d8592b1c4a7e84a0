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
SIZE_VARS = ("OMPI_COMM_WORLD_SIZE", "HOROVOD_SIZE", "PMI_SIZE", "SLURM_STEP_NUM_TASKS", "WORLD_SIZE")

# Open MPI's blocking waits busy-poll, so a rank that only waits (Horovod's background thread,
# a parameter server, a rank parked in a collective) takes a core from the ranks that compute.
# A value already in the environment wins.
MPI_RUNTIME_DEFAULTS = {"OMPI_MCA_mpi_yield_when_idle": "1"}


# torch's allocator asks for transparent huge pages only with this set (numpy always does), and
# large buffers handed to MPI copy faster on them. Read at torch's first allocation, so it must be
# in the environment before torch is imported (hvd_trainer's import sets it; a value there wins).
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
    return _first_int(RANK_VARS, 0, environ)


def launcher_size(environ: Optional[MutableMapping[str, str]] = None) -> int:
    """The job's process count as the launcher tells it (1 when started without one)."""
    return _first_int(SIZE_VARS, 1, environ)


def _first_int(names: tuple[str, ...], default: int, environ: Optional[MutableMapping[str, str]]) -> int:
    env = os.environ if environ is None else environ
    return next((int(env[v]) for v in names if v in env), default)


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
