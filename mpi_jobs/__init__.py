"""Launch helpers: argument lists for mpirun, horovodrun and srun, and SLURM batch scripts."""
from .commands import horovodrun_command, mpirun_command, srun_command

__all__ = ["mpirun_command", "horovodrun_command", "srun_command"]
