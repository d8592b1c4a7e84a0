"""A rank's training "batches" under FedAvg: one per client it simulates in a round (the
client's whole data; the strategy trains it for ``fedavg.local_epochs``). The loop's epoch is
the round, so it evaluates the global model after every round."""
from __future__ import annotations

from typing import Iterator, Optional

import numpy as np
import torch
from torch.utils.data import TensorDataset

from .partition import dealt, partition, sampled


class ClientRounds:
    """The interface of :class:`~hvd_trainer.data.sharding.ShardedBatches` (``len``,
    ``batches_in``, ``epoch``, ``bad_samples``, ``close``, ``sampler.num_samples``)."""

    def __init__(self, dataset: TensorDataset, clients: int, fraction: float, alpha: Optional[float],
                 seed: int, rank: int, ranks: int) -> None:
        self.x, self.y = dataset.tensors
        self.clients, self.fraction, self.seed = clients, fraction, seed
        self.rank, self.ranks = rank, ranks
        self.parts = partition(self.y.numpy(), clients, alpha, seed)
        self.sampler = self  # for the loop's one message that names a shard's size
        self.num_samples = sum(len(p) for p in self.parts[rank::ranks])

    def __len__(self) -> int:
        return len(dealt(sampled(self.clients, self.fraction, self.seed, 0), self.rank, self.ranks))

    def batches_in(self, offset: int) -> int:
        return len(self)

    def round_clients(self, round_index: int) -> list[Optional[int]]:
        return dealt(sampled(self.clients, self.fraction, self.seed, round_index), self.rank, self.ranks)

    def epoch(self, epoch: int, skip: int = 0, offset: int = 0) -> Iterator[tuple[torch.Tensor, ...]]:
        """Round ``epoch``'s clients on this rank after the first ``skip``: (client, x, y) per
        step (labels last, as the loop counts them); a padding step is client -1, no samples."""
        for k in self.round_clients(epoch)[skip:]:
            idx = torch.as_tensor(self.parts[k] if k is not None else np.zeros(0, dtype=np.int64))
            yield torch.tensor(-1 if k is None else k), self.x[idx], self.y[idx]

    def sizes(self) -> list[int]:
        return [len(p) for p in self.parts]

    def label_counts(self) -> list[list[int]]:
        classes = int(self.y.max()) + 1
        return [np.bincount(self.y[torch.as_tensor(p)].numpy(), minlength=classes).tolist() for p in self.parts]

    def bad_samples(self) -> list:
        return []

    def close(self) -> None:
        pass
