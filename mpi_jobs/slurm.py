"""SLURM batch scripts for hvd-train.

The script is generated from argument lists: every command line in it is ``shlex.join``-ed from a
list, never glued from strings, so paths and overrides with spaces survive.
"""
from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from typing import Optional, Sequence


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
    launcher: str = "srun"  # "srun" (PMIx, no mpirun) or "mpirun" (inside the allocation)
    nodelist: Sequence[str] = ()  # --nodelist: run on exactly these nodes
    map_by: Optional[str] = None  # mpirun --map-by (launcher="mpirun" only)
    env: dict = field(default_factory=dict)
    setup: Sequence[Sequence[str]] = ()  # commands before the launch, e.g. [["module", "load", "openmpi"]]
    requeue_on_preempt: bool = False

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
            # resume=auto picks up the newest checkpoint when the requeued job starts again
            lines.append("#SBATCH --requeue")
        lines += ["set -euo pipefail", "export OMP_NUM_THREADS=1"]
        lines += [f"export {k}={shlex.quote(str(v))}" for k, v in self.env.items()]
        lines += [shlex.join(list(cmd)) for cmd in self.setup]
        lines.append(shlex.join(self.launch_command()))
        return "\n".join(lines) + "\n"

    def launch_command(self) -> list[str]:
        if self.launcher == "srun":
            if self.map_by:
                raise ValueError("map_by is an mpirun option: use launcher='mpirun'")
            from .commands import srun_command
            return srun_command(self.ntasks, self.program, cpus_per_task=self.cpus_per_task)
        if self.launcher == "mpirun":
            # inside an allocation Open MPI reads the hosts and slots from SLURM itself
            from .commands import mpirun_command
            # (the local core count says nothing about the allocation: no oversubscription guess)
            return mpirun_command(self.ntasks, self.program, oversubscribe=False, yield_when_idle=False,
                                  map_by=self.map_by)
        raise ValueError(f"launcher must be srun or mpirun, got {self.launcher!r}")
