"""SLURM batch scripts for hvd-train.

The script is generated from argument lists: every command line in it is ``shlex.join``-ed from a
list, never glued from strings, so paths and overrides with spaces survive.
"""
from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional, Sequence

if TYPE_CHECKING:
    from .containers import Container


@dataclass(frozen=True)
class BatchJob:
    """One ``sbatch`` job that runs ``program`` on ``ntasks`` ranks."""

    program: Sequence[str]
    ntasks: int
    nodes: Optional[int] = None
    cpus_per_task: int = 1
    time: str = "01:00:00"
    job_name: str = "hvd-train"
    output: Optional[str] = None
    partition: Optional[str] = None
    # "srun" (PMIx, no mpirun), "mpirun" (inside the allocation), or "none": the program runs
    # in the batch shell and starts its own steps (hvd-tune launch=srun)
    launcher: str = "srun"
    nodelist: Sequence[str] = ()  # --nodelist: run on exactly these nodes
    map_by: Optional[str] = None  # mpirun --map-by (launcher="mpirun" only)
    env: dict = field(default_factory=dict)
    setup: Sequence[Sequence[str]] = ()  # commands before the launch, e.g. [["module", "load", "openmpi"]]
    requeue_on_preempt: bool = False
    container: Optional["Container"] = None  # run every rank inside this image (hybrid model)
    # seconds before the time limit at which SLURM sends SIGUSR1 to the batch shell (B:), which
    # forwards it to the ranks: they stop together at the next step with a checkpoint and exit
    # 75, and the script requeues the job (0: no warning signal)
    signal_seconds: int = 120

    def script(self) -> str:
        lines = ["#!/bin/bash", f"#SBATCH --job-name={self.job_name}", f"#SBATCH --ntasks={self.ntasks}",
                 f"#SBATCH --cpus-per-task={self.cpus_per_task}", f"#SBATCH --time={self.time}"]
        if self.nodes:
            lines.append(f"#SBATCH --nodes={self.nodes}")
        if self.output:
            lines.append(f"#SBATCH --output={self.output}")
        if self.nodelist:
            lines.append(f"#SBATCH --nodelist={','.join(self.nodelist)}")
        if self.partition:
            lines.append(f"#SBATCH --partition={self.partition}")
        if self.requeue_on_preempt:
            # resume=auto picks up the newest checkpoint when the requeued job starts again; the
            # requeued run appends to the same output file
            lines += ["#SBATCH --requeue", "#SBATCH --open-mode=append"]
        if self.signal_seconds:
            lines.append(f"#SBATCH --signal=B:USR1@{self.signal_seconds}")
        lines += ["set -euo pipefail", "export OMP_NUM_THREADS=1"]
        lines += [f"export {k}={shlex.quote(str(v))}" for k, v in self.env.items()]
        lines += [shlex.join(list(cmd)) for cmd in self.setup]
        lines += _LAUNCH_AND_FORWARD.format(launch=shlex.join(self.launch_command())).splitlines()
        if self.requeue_on_preempt:
            lines += _REQUEUE_ON_STOP.splitlines()
        lines.append('exit "$rc"')
        return "\n".join(lines) + "\n"

    def launch_command(self) -> list[str]:
        """The launch line: ``launcher ... [container runtime IMG] program`` (one container per
        rank; the image's MPI must match the MPI that launches it, see mpi_jobs.containers)."""
        program = self.container.wrap(self.program) if self.container else list(self.program)
        if self.launcher == "srun":
            if self.map_by:
                raise ValueError("map_by is an mpirun option: use launcher='mpirun'")
            from .commands import srun_command
            return srun_command(self.ntasks, program, cpus_per_task=self.cpus_per_task)
        if self.launcher == "mpirun":
            # inside an allocation Open MPI reads the hosts and slots from SLURM itself
            from .commands import mpirun_command
            # (the local core count says nothing about the allocation: no oversubscription guess)
            return mpirun_command(self.ntasks, program, oversubscribe=False, yield_when_idle=False,
                                  map_by=self.map_by)
        if self.launcher == "none":
            return program
        raise ValueError(f"launcher must be srun, mpirun or none, got {self.launcher!r}")


# The launch runs in the background so that the batch shell can take SLURM's warning signal (or
# scancel --signal=USR1 --batch) and forward it to the job step: srun and mpirun pass it on to
# every rank. A wait cut short by the trap is resumed. Exit 75 means "stopped at a step boundary
# with a checkpoint": the job is requeued and resumes from it.
_LAUNCH_AND_FORWARD = """set +e
forwarded=0
forward() {{ forwarded=1; echo "hvd-launch: $1 received: forwarding it to the ranks" >&2; kill -s "$1" "$step" 2>/dev/null; }}
trap 'forward USR1' USR1
trap 'forward TERM' TERM
{launch} &
step=$!
while :; do
  forwarded=0
  wait "$step"; rc=$?
  if [ "$forwarded" = 1 ] && [ "$rc" -gt 128 ]; then continue; fi
  break
done"""
_REQUEUE_ON_STOP = """if [ "$rc" = 75 ] && [ -n "${SLURM_JOB_ID:-}" ]; then
  echo "hvd-launch: the ranks stopped with a checkpoint: requeueing job $SLURM_JOB_ID" >&2
  scontrol requeue "$SLURM_JOB_ID"
fi
"""
