"""The communicator a run treats as its whole job.

Normally ``MPI.COMM_WORLD``. ``hvd-tune`` packs several trials into one allocation: each group
of ranks runs its trial inside :func:`confined`, and every collective of that run (Horovod's
init, DDP's rendezvous, the parameter server, the pipeline, the control plane, the config check)
then stays inside the group, so concurrent trials never share a collective.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Optional

from .launch_env import launcher_size


@dataclass(frozen=True)
class Scope:
    comm: Any  # an mpi4py intracommunicator: this group's ranks
    label: str  # names the run in messages that reach the whole job ("trial 3")
    job_ranks: tuple[int, ...]  # the job rank of each of the group's ranks


_scope: Optional[Scope] = None


def scope() -> Optional[Scope]:
    """The group this process runs confined to, or None (the run is the job)."""
    return _scope


def comm():
    """The run's communicator (collectives of a run go over this, never COMM_WORLD)."""
    if _scope is not None:
        return _scope.comm
    from mpi4py import MPI

    return MPI.COMM_WORLD


def size() -> int:
    """The run's process count, known without communicating."""
    return _scope.comm.Get_size() if _scope is not None else launcher_size()


def who(rank: int) -> str:
    """``rank`` of this run as the job's output should name it."""
    if _scope is None:
        return f"rank {rank}"
    return f"{_scope.label}, rank {rank} (job rank {_scope.job_ranks[rank]})"


@contextmanager
def confined(group_comm, label: str) -> Iterator[Scope]:
    """Run what is inside as if ``group_comm`` were the whole job."""
    global _scope
    from mpi4py import MPI

    previous = _scope
    mine = list(range(group_comm.Get_size()))
    groups = group_comm.Get_group(), MPI.COMM_WORLD.Get_group()
    job_ranks = MPI.Group.Translate_ranks(groups[0], mine, groups[1])
    for g in groups:
        g.Free()
    _scope = Scope(group_comm, label, tuple(job_ranks))
    try:
        yield _scope
    finally:
        _scope = previous
