"""One persistent input pipeline per rank, for data that is not in-memory tensors.

In-memory tensors keep the fast path of :class:`~hvd_trainer.data.sharding.ShardedBatches` (a
batch is one index into each tensor). Any other ``Dataset`` goes through one ``DataLoader`` per rank,
built once: ``data.num_workers`` worker processes decode and augment ahead of the training
thread (``prefetch_factor`` batches each), the workers live across epochs
(``persistent_workers``), and batches are pinned for the copy to the GPU (``pin_memory``, CUDA
only). How the workers start: :mod:`hvd_trainer.data.workers`.

Exact resume: the sampler (:class:`EpochSampler`) is told the epoch and the first sample
before each epoch's iterator starts, so a run resumed in the middle of an epoch sees exactly the
samples an uninterrupted run would have seen from there, none twice and none skipped.

What a worker does per batch (per-sample seeds, unreadable samples set aside and sent back with
the batch) is :mod:`hvd_trainer.data.samples`; this module strips them off again (``error``: the
job stops with one line naming the file; ``skip``: the batch gets shorter, but every rank still
runs the same number of batches).

Every training rank builds its pipeline from the same data set, config and seed.
"""
from __future__ import annotations

from functools import partial
from typing import Any, Iterator, Optional

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, TensorDataset

from ..config import ConfigError, DataConfig
from .samples import BadSamples, SeededSamples, SliceSamples, collate, mix, seed_worker
from .sharding import ShardedBatches, eval_slice, local_order
from .workers import WorkerLoader, worker_context


class EpochSampler(Sampler):
    """This rank's sample order for one epoch at a time, from a given position.

    Global data sets are sharded exactly as :class:`~hvd_trainer.data.sharding.ShardedBatches`
    shards them (``DistributedSampler``: strided, padded), so the loader and the tensor fast path see
    the same samples. Rank-local data sets (``rank_local``: shards) use their own order, padded
    or cut to the count the ranks agreed on. Yields ``(epoch, index)`` keys for
    :class:`SeededSamples`.
    """

    def __init__(self, dataset: Dataset, rank: int, size: int, seed: int, shuffle: bool) -> None:
        self.local = bool(getattr(dataset, "rank_local", False))
        self.rank, self.seed, self.shuffle = rank, seed, shuffle
        self.n = len(dataset)
        if self.local:
            self.num_samples = int(dataset.epoch_samples)
        else:
            self.dist = DistributedSampler(dataset, num_replicas=size, rank=rank, shuffle=shuffle,
                                           seed=seed, drop_last=False)
            self.num_samples = self.dist.num_samples
        self.epoch, self.start = 0, 0

    def order(self, epoch: int) -> torch.Tensor:
        """Every index of this rank's epoch, in order."""
        if self.local:
            return local_order(self.n, self.num_samples, self.seed, epoch, self.rank, self.shuffle)
        self.dist.set_epoch(epoch)
        return torch.as_tensor(list(iter(self.dist)), dtype=torch.long)

    def set_position(self, epoch: int, start: int) -> None:
        """The next iteration yields ``epoch``'s samples from position ``start`` on."""
        self.epoch, self.start = epoch, start

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.epoch
        return iter([(epoch, int(i)) for i in self.order(epoch)[self.start:]])

    def __len__(self) -> int:
        return max(0, self.num_samples - self.start)


def loader_kwargs(cfg: DataConfig, device: torch.device, seed: int, rank: int, dataset: Dataset) -> dict[str, Any]:
    """The DataLoader settings of ``cfg`` (workers, prefetch, pinning) for this rank."""
    workers = cfg.num_workers
    kw: dict[str, Any] = {"num_workers": workers, "collate_fn": collate,
                          "pin_memory": cfg.pin_memory and device.type == "cuda",  # not exercised here
                          "generator": torch.Generator().manual_seed(mix(seed, rank))}
    if workers > 0:
        kw.update(prefetch_factor=cfg.prefetch_factor, persistent_workers=cfg.persistent_workers,
                  worker_init_fn=partial(seed_worker, seed, rank),
                  multiprocessing_context=worker_context(cfg.worker_start, dataset, rank))
    return kw


class LoaderBatches:
    """Per-rank training batches through one persistent DataLoader (or, for rank-local tensors,
    by indexing). The interface of :class:`~hvd_trainer.data.sharding.ShardedBatches`: ``len()``,
    ``sampler.num_samples``, ``epoch(epoch, skip)``, ``bad_samples()``; and ``close()``."""

    def __init__(self, dataset: Dataset, batch_size: int, rank: int, size: int, seed: int,
                 cfg: DataConfig, device: torch.device = torch.device("cpu")) -> None:
        self.batch_size, self.drop_last = batch_size, cfg.drop_last
        self.sampler = EpochSampler(dataset, rank, size, seed, cfg.shuffle)
        self._tensors = dataset.tensors if isinstance(dataset, TensorDataset) else None
        self._bad = BadSamples(cfg.bad_samples)
        self._empty: Optional[tuple] = None  # a batch of no samples, shaped like the last one
        self.loader: Optional[DataLoader] = None
        if self._tensors is None:
            samples = SeededSamples(dataset, seed)
            self.loader = WorkerLoader(samples, batch_size=batch_size, sampler=self.sampler,
                                       drop_last=cfg.drop_last, **loader_kwargs(cfg, device, seed, rank, samples))

    def __len__(self) -> int:
        n = self.sampler.num_samples
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def batches_in(self, offset: int) -> int:
        """Batches per rank in an epoch (``offset``: see :class:`~hvd_trainer.data.sharding.ShardedBatches`)."""
        _no_offset(offset)
        return len(self)

    def epoch(self, epoch: int, skip: int = 0, offset: int = 0) -> Iterator[tuple[torch.Tensor, ...]]:
        """Batches of ``epoch`` after the first ``skip`` (an exact resume: the sampler starts
        at sample ``skip * batch_size``). A batch whose every sample was skipped as unreadable
        comes out empty, so the ranks still agree on the number of steps."""
        _no_offset(offset)
        if self._tensors is not None:  # rank-local tensors: index, as the fast path does
            idx = self.sampler.order(epoch)
            for b in range(skip, len(self)):
                chunk = idx[b * self.batch_size:(b + 1) * self.batch_size]
                yield tuple(t[chunk] for t in self._tensors)
            return
        self.sampler.set_position(epoch, skip * self.batch_size)
        for _, collated in zip(range(skip, len(self)), self.loader):
            batch = self._bad.take(collated)
            if batch is None:
                batch = self._empty or (torch.empty(0), torch.empty(0, dtype=torch.long))
            else:
                self._empty = tuple(t[:0] for t in batch)
            yield batch

    def bad_samples(self) -> list[str]:
        """Paths this rank skipped as unreadable so far (``data.bad_samples: skip``), each once."""
        return self._bad.paths()

    def close(self) -> None:
        """Stop the worker processes (persistent workers otherwise live until garbage collection)."""
        _shutdown(self.loader)


class EvalBatches:
    """This rank's held-out batches through workers, iterable once per evaluation; unreadable
    samples are handled as in training, and a batch left with none is not yielded."""

    def __init__(self, loader: DataLoader, mode: str) -> None:
        self.loader, self._bad = loader, BadSamples(mode)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        for collated in self.loader:
            batch = self._bad.take(collated)
            if batch is not None:
                yield batch

    def bad_samples(self) -> list[str]:
        return self._bad.paths()

    def close(self) -> None:
        _shutdown(self.loader)


def _shutdown(loader: Optional[DataLoader]) -> None:
    if loader is not None and getattr(loader, "_iterator", None) is not None:
        loader._iterator._shutdown_workers()
        loader._iterator = None


def _no_offset(offset: int) -> None:
    if offset:
        raise ConfigError("data.name: a number of ranks that changed in the middle of an epoch (elastic) "
                          "is only supported for in-memory tensor data sets")


def eval_loader(dataset: Dataset, batch_size: int, rank: int, size: int, cfg: DataConfig,
                device: torch.device, seed: int) -> EvalBatches:
    """Evaluation batches of a data set that is not in-memory tensors: a disjoint, unpadded
    slice per rank (all of a rank-local data set), through workers like training."""
    part = range(len(dataset)) if getattr(dataset, "rank_local", False) else eval_slice(len(dataset), rank, size)
    samples = SliceSamples(dataset, part)
    loader = WorkerLoader(samples, batch_size=batch_size, shuffle=False, **loader_kwargs(cfg, device, seed, rank, samples))
    return EvalBatches(loader, cfg.bad_samples)


def is_fast_path(dataset: Dataset) -> bool:
    """In-memory tensors shared by every rank: batches are indexed, no loader is needed."""
    return isinstance(dataset, TensorDataset) and not getattr(dataset, "rank_local", False)


def make_batches(dataset: Dataset, batch_size: int, rank: int, size: int, seed: int, cfg: DataConfig,
                 device: torch.device = torch.device("cpu")):
    """This rank's training batches: the tensor fast path, or the persistent pipeline. Every
    training rank calls it with the same data set, batch size, seed and config."""
    if is_fast_path(dataset):
        return ShardedBatches(dataset, batch_size, rank, size, seed, cfg.shuffle, cfg.drop_last)
    return LoaderBatches(dataset, batch_size, rank, size, seed, cfg, device)


def data_summary(train: Dataset, test: Dataset, cfg: DataConfig) -> dict[str, Any]:
    """What summary.json says about the data: the loader settings, and which shards each rank opened."""
    indexed = isinstance(train, TensorDataset)  # in-memory tensors (shared or rank-local): no workers
    out: dict[str, Any] = {"name": cfg.name, "loader": "tensors" if indexed else "workers",
                           "num_workers": 0 if indexed else cfg.num_workers}
    if not indexed:
        out["bad_samples"] = cfg.bad_samples
    for key, ds in (("shards_opened", train), ("test_shards_opened", test)):
        if getattr(ds, "rank_local", False):
            out[key] = ds.opened_by_rank
    return out
