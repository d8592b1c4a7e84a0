"""One rank's random streams: seeded per rank, captured and restored in a form weights-only
loading accepts."""
from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def capture() -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": list(random.getstate()[1]),
        "python_version": int(random.getstate()[0]),
    }


def restore(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    random.setstate((state["python_version"], tuple(state["python"]), None))


def seed_rank(seed: int, rank: int) -> None:
    """Seed this rank's torch, numpy and ``random`` streams with ``seed + rank`` (dropout and
    other per-rank draws differ across ranks, reproducibly). Call after the model is built from
    ``seed`` on every rank (rank 0's weights are broadcast anyway)."""
    random.seed(seed + rank)
    np.random.seed((seed + rank) % (2 ** 32))
    torch.manual_seed(seed + rank)
