"""What a loader worker does for one batch: fetch each sample with its own seeds, and set the
unreadable ones aside instead of failing the batch.

Reproducible augmentation: before fetching sample ``i`` of epoch ``e`` the sample's worker seeds
torch, numpy and ``random`` from ``(seed, e, i)``. A sample's random draws are therefore the same
whichever worker or rank fetches it, at any ``num_workers``, and after a resume (a per-worker
stream would depend on how many samples that worker had fetched before). Each worker is also
seeded per (rank, worker) at start, for draws made outside ``__getitem__``. With
``num_workers=0`` the training process's own streams (dropout) are saved and put back around
every batch, so they do not depend on the data either.

Unreadable samples: a data set raises :class:`~hvd_trainer.data.validation.BadSample`; the
sample is left out of its batch and travels back with it as ``(path, message)``
(:class:`Collated`: a worker's exception would reach the training process wrapped in a
traceback). :class:`BadSamples`, in the training process, then stops the job with the one line
or remembers the path (``data.bad_samples``).
"""
from __future__ import annotations

import random
from typing import Any, Callable, NamedTuple, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, default_collate, get_worker_info

from ..config import ConfigError
from ..runtime import rng
from .validation import BadSample


def mix(*parts: int) -> int:
    """A 63-bit seed from integers (SplitMix64 steps): nearby inputs give unrelated seeds."""
    z = 0x9E3779B97F4A7C15
    for p in parts:
        z = (z ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        z = (z ^ (z >> 31)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
    return z >> 1


def seed_all(seed: int) -> None:
    """Seed the CPU streams a transform draws from. (``torch.manual_seed`` would also seed every
    accelerator backend: ~100x slower, ~0.1 ms per sample here.)"""
    torch.default_generator.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


def seed_worker(seed: int, rank: int, worker_id: int) -> None:
    """A loader worker's streams at start, per (rank, worker): for draws outside ``__getitem__``."""
    seed_all(mix(seed, rank, worker_id, 0x5EED))


class Fetched(list):
    """The samples of one batch that could be read; ``bad``: ``(path, message)`` of the others;
    ``error``: a config error the data set raised (it ends the job whatever ``bad_samples`` says)."""

    def __init__(self, good: list, bad: list[tuple[str, str]], error: str = "") -> None:
        super().__init__(good)
        self.bad, self.error = bad, error


def fetch_all(fetch: Callable[[Any], Any], keys: Sequence[Any]) -> Fetched:
    good, bad = [], []
    for key in keys:
        try:
            good.append(fetch(key))
        except BadSample as err:
            bad.append((err.path, str(err)))
        except ConfigError as err:  # sent back as data: a worker's exception would arrive wrapped
            return Fetched([], bad, str(err))
    return Fetched(good, bad)


class Collated(NamedTuple):
    """What a worker sends back per batch: the collated good samples (None: none was good), the
    bad ones left out and any config error, which the loader's consumer strips off
    (:class:`BadSamples`)."""

    batch: Any
    bad: tuple[tuple[str, str], ...]
    error: str = ""


def collate(fetched: Fetched) -> Collated:
    good = list(fetched)
    return Collated(default_collate(good) if good else None, tuple(getattr(fetched, "bad", ())),
                    getattr(fetched, "error", ""))


class SeededSamples(Dataset):
    """``dataset`` indexed by ``(epoch, index)``: each sample fetched with its own seeds."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def _fetch(self, key: tuple[int, int]) -> Any:
        epoch, index = key
        seed_all(mix(self.seed, epoch, index))
        return self.dataset[index]

    def __getitem__(self, key: tuple[int, int]) -> Any:
        return self._keeping_streams(self._fetch, key)

    def __getitems__(self, keys: list[tuple[int, int]]) -> Fetched:
        return self._keeping_streams(fetch_all, self._fetch, keys)

    @staticmethod
    def _keeping_streams(fn: Callable, *args: Any) -> Any:
        if get_worker_info() is not None:  # a worker process: its streams are its own
            return fn(*args)
        kept = rng.capture()  # the training process (num_workers=0): leave its streams as they were
        try:
            return fn(*args)
        finally:
            rng.restore(kept)


class SliceSamples(Dataset):
    """``dataset`` restricted to ``indices`` (evaluation), its unreadable samples set aside."""

    def __init__(self, dataset: Dataset, indices: Sequence[int]) -> None:
        self.dataset, self.indices = dataset, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Any:
        return self.dataset[self.indices[i]]

    def __getitems__(self, keys: list[int]) -> Fetched:
        return fetch_all(self.__getitem__, keys)


class BadSamples:
    """This rank's unreadable samples as its loader meets them: ``error`` stops at the first with
    its one line; ``skip`` remembers each path once, in the order first met."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self._paths: dict[str, None] = {}

    def take(self, collated: Collated) -> Optional[tuple]:
        """The batch without its bad samples (None when there is none left)."""
        if collated.error:
            raise ConfigError(collated.error)
        for path, message in collated.bad:
            if self.mode == "error":
                raise BadSample(message, path)
            self._paths.setdefault(path, None)
        return None if collated.batch is None else _as_tuple(collated.batch)

    def paths(self) -> list[str]:
        return list(self._paths)


def _as_tuple(batch: Any) -> tuple:
    return tuple(batch) if isinstance(batch, (list, tuple)) else (batch,)
