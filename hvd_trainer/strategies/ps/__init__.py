"""The mpi4py parameter server: ``worker.py`` (the strategy the training loop sees),
``server.py`` (a server rank's duty), ``rules.py`` (sync / async / SSP / backup workers, without
MPI) and ``wire.py`` (tags, key ranges, liveness-checked waits)."""
from .worker import ParameterServerStrategy

__all__ = ["ParameterServerStrategy"]
