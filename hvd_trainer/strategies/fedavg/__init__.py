"""Federated averaging over virtual clients (``strategy: fedavg``).

    partition  which samples each client holds (IID, or Dirichlet over labels), which clients a
               round samples and which rank simulates each: pure, seeded rules
    rounds     a rank's training "batches": one step per client it simulates in a round
    strategy   local training of a client, the weighted average at the end of a round
"""
from .strategy import FedAvgStrategy

__all__ = ["FedAvgStrategy"]
