"""``launch: packed``: the job's N ranks split into N/k groups, each running one trial at a time
inside the job, confined to its own communicator (:mod:`..runtime.world`).

    world rank r -> group r // k, group rank r % k; group rank 0 is the group's leader

Start (collective over the job): rank 0 creates or loads the study and lists the trials a
previous run left running; they are dealt out to the groups, which resume them first. Then
each group loops on its own: the leader claims a trial, the group runs it, the leader records
it. A group with nothing left waits for the others without spinning; the job ends together,
and rank 0 writes the results. A stop signal ends each group's running trial with a checkpoint
(the trial stays running in the journal) and the job exits 75, to be requeued.
"""
from __future__ import annotations

import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Optional

from ..config import ConfigError, TrainConfig
from ..runtime import world
from ..runtime.control import MPIControlPlane, StopSignals
from ..runtime.errors import EXIT_PREEMPTED
from ..runtime.launch_env import abort_job, apply_mpi_defaults, usable_cores
from . import storage
from .study import StudyConfig
from .trials import PREEMPTED, printer, record, run_point


def groups_of(size: int, k: int) -> list[list[int]]:
    """The job's ranks, k to a group, in order."""
    if size % k:
        raise ConfigError(f"ranks_per_trial: {k} does not divide the job's {size} ranks")
    return [list(range(g * k, (g + 1) * k)) for g in range(size // k)]


def deal(numbers: list[int], n_groups: int) -> list[list[int]]:
    """Interrupted trials, round-robin over the groups."""
    return [numbers[g::n_groups] for g in range(n_groups)]


def _quiet_wait(comm, poll_s: float = 0.05) -> None:
    """A barrier that sleeps while it waits: an idle group leaves its cores to the others."""
    req = comm.Ibarrier()
    while not req.Test():
        time.sleep(poll_s)


def run_packed(cfg: StudyConfig, base_dir: Path, base: TrainConfig) -> int:
    """``base``: the training config before a trial's parameters (its stop signals and peer
    timeout hold for the whole study)."""
    apply_mpi_defaults()
    from mpi4py import MPI

    groups = groups_of(MPI.COMM_WORLD.Get_size(), cfg.ranks_per_trial)  # the same verdict everywhere
    try:
        return _study(cfg, base_dir, base, groups)
    except BaseException as err:  # noqa: BLE001 - one failing rank must end the job, not hang it
        if isinstance(err, SystemExit) and not err.code:
            raise
        print(f"hvd-tune: job rank {MPI.COMM_WORLD.Get_rank()} failed: {type(err).__name__}: {err}",
              file=sys.stderr)
        traceback.print_exc()
        sys.stderr.flush()
        abort_job(1)
        raise


def _study(cfg: StudyConfig, base_dir: Path, base: TrainConfig, groups: list[list[int]]) -> int:
    from mpi4py import MPI

    job = MPI.COMM_WORLD
    rank = job.Get_rank()
    me = rank // cfg.ranks_per_trial
    folder = storage.study_dir(cfg)
    leftover: list[int] = []
    if rank == 0:
        study = storage.open_study(cfg, folder)
        leftover = [t.number for t in storage.interrupted(study)]
    mine = deal(job.bcast(leftover, root=0), len(groups))[me]
    # a trial's local size is its group's; the host's cores are shared among all its job ranks
    node = job.Split_type(MPI.COMM_TYPE_SHARED)
    os.environ.setdefault("HVD_TRAINER_THREADS", str(max(1, usable_cores() // node.Get_size())))
    node.Free()
    group = job.Split(color=me, key=rank)
    leader = group.Get_rank() == 0
    study = storage.open_study(cfg, folder, stream=me) if leader else None
    signals = StopSignals(base.checkpoint.stop_signals)  # between trials; a trial's catcher shares a stop
    # a heartbeat over the whole job: a 1-rank trial has no peer of its own to notice it froze,
    # and the other groups would wait for it at the end
    watch = MPIControlPlane(StopSignals(()), base.runtime.peer_timeout_s, True, _who(cfg, folder)) \
        if len(groups) > 1 else None
    deadline = time.monotonic() + cfg.time_budget_s if cfg.time_budget_s else None
    stopped = False
    try:
        while True:
            stop = group.allreduce(int(signals.received is not None), op=MPI.MAX)
            handle, params = _claim(study, cfg, folder, deadline, mine, groups[me]) if leader and not stop \
                else (None, {})
            claim = group.bcast(None if handle is None else (handle.number, params), root=0)
            if claim is None:
                stopped = bool(stop)
                break
            number, params = claim
            label = f"trial {number}"
            say = printer(label)
            run_dir = storage.trial_dir(folder, number)
            if leader:
                say(f"on job ranks {groups[me][0]}-{groups[me][-1]}: "
                    + ", ".join(f"{k}={v}" for k, v in params.items()))
            with world.confined(group, label):
                outcome = run_point(cfg, base_dir, params, run_dir, handle, say)
            if leader:
                record(study, handle, outcome, str(run_dir), groups[me])
                say(outcome.describe(cfg.metric))
            if outcome.state == PREEMPTED:
                stopped = True
                break
        _quiet_wait(job)
        if watch is not None:
            watch.close()
        # the catcher stays until the end: a group that is done must outlive a stop signal
        # (the default action of USR1 and TERM ends the process) while the others checkpoint
        stopped = bool(job.allreduce(int(stopped or signals.received is not None), op=MPI.MAX))
    finally:
        signals.restore()
    if rank == 0:
        from .results import write_results

        write_results(storage.open_study(cfg, folder), cfg, folder, base_dir)
    group.Free()
    return EXIT_PREEMPTED if stopped else 0


def _claim(study, cfg: StudyConfig, folder: Path, deadline: Optional[float], mine: list[int],
           ranks: list[int]) -> tuple[Any, dict[str, Any]]:
    """:func:`storage.claim`, with the group's job ranks in the journal at once: a lost rank is
    then named with its trial."""
    handle, params = storage.claim(study, cfg, folder, deadline, mine)
    if handle is not None:
        handle.set_user_attr("ranks", ranks)
    return handle, params


def _who(cfg: StudyConfig, folder: Path):
    """Names a job rank with the trial it runs, read from the journal when a rank is lost."""
    def who(rank: int) -> str:
        try:
            running = [t.number for t in storage.interrupted(storage.open_study(cfg, folder))
                       if rank in t.user_attrs.get("ranks", ())]
        except Exception:  # noqa: BLE001 - naming the rank must not fail the message
            running = []
        return f"job rank {rank}" + (f" (trial {running[0]})" if running else "")
    return who
