"""FedAvg's pure rules: clients' data, each round's sample of clients, and the weighted mean.

A Dirichlet(alpha) split over labels (Hsu et al. 2019): for every class, its samples are dealt
to the K clients in proportions drawn from Dir(alpha, ..., alpha). Small alpha gives each client
few classes (pathological non-IID); as alpha grows every client's label mix approaches the
whole set's (IID). Everything is seeded, so every rank computes the same split.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np


def partition(labels: np.ndarray, clients: int, alpha: Optional[float], seed: int) -> list[np.ndarray]:
    """Each client's sample indices (sorted); every sample belongs to exactly one client.
    ``alpha`` None: IID (a seeded shuffle cut into near-equal parts)."""
    rng = np.random.default_rng([seed, 1])
    n = len(labels)
    if alpha is None:
        return [np.sort(part) for part in np.array_split(rng.permutation(n), clients)]
    parts: list[list[int]] = [[] for _ in range(clients)]
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        shares = rng.dirichlet(np.full(clients, alpha))
        cuts = np.floor(np.cumsum(shares)[:-1] * len(idx)).astype(int)
        for k, chunk in enumerate(np.split(idx, cuts)):
            parts[k].extend(chunk.tolist())
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def clients_per_round(clients: int, fraction: float) -> int:
    return max(1, min(clients, round(fraction * clients)))


def sampled(clients: int, fraction: float, seed: int, round_index: int) -> list[int]:
    """The clients that train in round ``round_index`` (seeded, without replacement)."""
    rng = np.random.default_rng([seed, 2, round_index])
    return sorted(rng.choice(clients, clients_per_round(clients, fraction), replace=False).tolist())


def dealt(chosen: Sequence[int], rank: int, ranks: int) -> list[Optional[int]]:
    """The clients rank ``rank`` simulates, one after another; every rank gets the same count
    (None pads: a step without a client), so the ranks meet at the round's end together."""
    mine: list[Optional[int]] = list(chosen[rank::ranks])
    return mine + [None] * (math.ceil(len(chosen) / ranks) - len(mine))


def weighted_mean(total: np.ndarray, weight: float, fallback: np.ndarray) -> np.ndarray:
    """``sum_k n_k w_k / sum_k n_k``; the previous model when no sampled client held data."""
    return total / weight if weight > 0 else fallback
