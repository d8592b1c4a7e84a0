"""One persistent input pipeline per rank, for data that is not in-memory tensors.

In-memory tensors keep the fast path of :class:`hvd_trainer.data.ShardedBatches` (a batch is
one index into each tensor). Any other ``Dataset`` goes through one ``DataLoader`` per rank,
built once: ``data.num_workers`` worker processes decode and augment ahead of the training
thread (``prefetch_factor`` batches each), the workers live across epochs
(``persistent_workers``), and batches are pinned for the copy to the GPU (``pin_memory``, CUDA
only).

Exact resume: the sampler (:class:`EpochSampler`) is told the epoch and the first sample
before each epoch's iterator starts, so a run resumed in the middle of an epoch sees exactly the
samples an uninterrupted run would have seen from there, none twice and none skipped.

Reproducible augmentation: before fetching sample ``i`` of epoch ``e`` the sample's worker seeds
torch, numpy and ``random`` from ``(seed, e, i)``. A sample's random draws are therefore the same
whichever worker or rank fetches it, at any ``num_workers``, and after a resume (a per-worker
stream would depend on how many samples that worker had fetched before). Each worker is also
seeded per (rank, worker) at start, for draws made outside ``__getitem__``. With
``num_workers=0`` the training process's own streams (dropout) are saved and put back around
every batch, so they do not depend on the data either.

Every training rank builds its pipeline from the same data set, config and seed.
"""
from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.context
import pickle
import pickletools
import random
import sys
import types
import warnings
from functools import partial
from typing import Any, Iterator, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, TensorDataset, get_worker_info

from . import rng
from .config import ConfigError, DataConfig
from .datasets import local_order


def _mix(*parts: int) -> int:
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


class SeededSamples(Dataset):
    """``dataset`` indexed by ``(epoch, index)``: each sample fetched with its own seeds."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def _fetch(self, key: tuple[int, int]) -> Any:
        epoch, index = key
        seed_all(_mix(self.seed, epoch, index))
        return self.dataset[index]

    def __getitem__(self, key: tuple[int, int]) -> Any:
        return self.__getitems__([key])[0]

    def __getitems__(self, keys: list[tuple[int, int]]) -> list:
        if get_worker_info() is not None:  # a worker process: its streams are its own
            return [self._fetch(k) for k in keys]
        kept = rng.capture()  # the training process (num_workers=0): leave its streams as they were
        try:
            return [self._fetch(k) for k in keys]
        finally:
            rng.restore(kept)


def _init_worker(seed: int, rank: int, worker_id: int) -> None:
    seed_all(_mix(seed, rank, worker_id, 0x5EED))


class EpochSampler(Sampler):
    """This rank's sample order for one epoch at a time, from a given position.

    Global data sets are sharded exactly as :class:`~hvd_trainer.data.ShardedBatches` shards
    them (``DistributedSampler``: strided, padded), so the loader and the tensor fast path see
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


# What a forkserver loads once, so that each worker it forks starts with torch and the pipeline
# already imported (a worker then starts in milliseconds instead of a torch import).
FORKSERVER_PRELOAD = ["hvd_trainer.pipeline"]


def _refers_to_main(blob: bytes) -> bool:
    """Whether a pickle names anything in ``__main__`` (a class or function of the launching
    script), which a forkserver worker could only find by running that script again."""
    return any(isinstance(arg, str) and arg == "__main__" for _, arg, _ in pickletools.genops(blob))


def worker_context(start: str, dataset: Dataset, rank: int = 0) -> multiprocessing.context.BaseContext:
    """How this rank's loader workers start.

    ``fork`` copies a rank that already runs Horovod's background thread and MPI's own threads;
    a lock one of them held at that moment stays locked in the child for good. Seen here: a
    worker blocked on a futex from its first batch, its rank blocked waiting for the batch, and
    the other rank blocked in the next allreduce (a 2-rank image job, once in a suite run). A
    forkserver is started by fork+exec, before anything else runs in it, and forks the workers
    from that clean, single-threaded process; :class:`WorkerLoader` keeps it from running the
    launching script again. It needs a data set that pickles without the launching script's own
    classes; any other falls back to fork, with a warning."""
    if start != "fork":
        try:
            why = "it refers to the launching script (__main__)" if _refers_to_main(pickle.dumps(dataset)) else ""
        except Exception as err:  # lambdas, open handles, locally defined classes ...
            why = f"it cannot be pickled ({type(err).__name__}: {err})"
        if why:
            if rank == 0:
                warnings.warn(f"data.worker_start={start}: the data set cannot go to the workers that way: {why}; "
                              "starting loader workers with fork, which can hang after MPI and Horovod start their "
                              "threads. Define it in an importable module, or set data.worker_start=fork to silence "
                              "this", RuntimeWarning, stacklevel=2)
            start = "fork"
    ctx = multiprocessing.get_context(start)
    if start == "forkserver":
        ctx.set_forkserver_preload(FORKSERVER_PRELOAD)  # read when the server starts: once per rank
    return ctx


@contextlib.contextmanager
def _launching_script_hidden():
    """While workers start: a ``__main__`` without a file or module name, so that multiprocessing
    does not tell a forkserver or spawned worker to run the launching script again (a training
    script without an ``if __name__ == "__main__"`` guard would train once more in every worker).
    The data set has been checked not to need it (:func:`worker_context`)."""
    main = sys.modules["__main__"]
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        sys.modules["__main__"] = main


class WorkerLoader(DataLoader):
    """A DataLoader whose forkserver or spawn workers start without the launching script."""

    def _get_iterator(self):
        if self.num_workers == 0 or self.multiprocessing_context is None \
                or self.multiprocessing_context.get_start_method() == "fork":
            return super()._get_iterator()
        with _launching_script_hidden():
            return super()._get_iterator()


def loader_kwargs(cfg: DataConfig, device: torch.device, seed: int, rank: int, dataset: Dataset) -> dict[str, Any]:
    """The DataLoader settings of ``cfg`` (workers, prefetch, pinning) for this rank."""
    workers = cfg.num_workers
    kw: dict[str, Any] = {"num_workers": workers,
                          "pin_memory": cfg.pin_memory and device.type == "cuda",  # not exercised here
                          "generator": torch.Generator().manual_seed(_mix(seed, rank))}
    if workers > 0:
        kw.update(prefetch_factor=cfg.prefetch_factor, persistent_workers=cfg.persistent_workers,
                  worker_init_fn=partial(_init_worker, seed, rank),
                  multiprocessing_context=worker_context(cfg.worker_start, dataset, rank))
    return kw


def _as_tuple(batch: Any) -> tuple:
    return tuple(batch) if isinstance(batch, (list, tuple)) else (batch,)


class LoaderBatches:
    """Per-rank training batches through one persistent DataLoader (or, for rank-local tensors,
    by indexing). The interface of :class:`~hvd_trainer.data.ShardedBatches`: ``len()``,
    ``sampler.num_samples``, ``epoch(epoch, skip)``; and ``close()``."""

    def __init__(self, dataset: Dataset, batch_size: int, rank: int, size: int, seed: int,
                 cfg: DataConfig, device: torch.device = torch.device("cpu")) -> None:
        self.batch_size, self.drop_last = batch_size, cfg.drop_last
        self.sampler = EpochSampler(dataset, rank, size, seed, cfg.shuffle)
        self._tensors = dataset.tensors if isinstance(dataset, TensorDataset) else None
        self.loader: Optional[DataLoader] = None
        if self._tensors is None:
            samples = SeededSamples(dataset, seed)
            self.loader = WorkerLoader(samples, batch_size=batch_size, sampler=self.sampler,
                                       drop_last=cfg.drop_last, **loader_kwargs(cfg, device, seed, rank, samples))

    def __len__(self) -> int:
        n = self.sampler.num_samples
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def batches_in(self, offset: int) -> int:
        """Batches per rank in an epoch (``offset``: see :class:`~hvd_trainer.data.ShardedBatches`)."""
        _no_offset(offset)
        return len(self)

    def epoch(self, epoch: int, skip: int = 0, offset: int = 0) -> Iterator[tuple[torch.Tensor, ...]]:
        """Batches of ``epoch`` after the first ``skip`` (an exact resume: the sampler starts
        at sample ``skip * batch_size``)."""
        _no_offset(offset)
        if self._tensors is not None:  # rank-local tensors: index, as the fast path does
            idx = self.sampler.order(epoch)
            for b in range(skip, len(self)):
                chunk = idx[b * self.batch_size:(b + 1) * self.batch_size]
                yield tuple(t[chunk] for t in self._tensors)
            return
        self.sampler.set_position(epoch, skip * self.batch_size)
        for b, batch in zip(range(skip, len(self)), self.loader):
            yield _as_tuple(batch)

    def close(self) -> None:
        """Stop the worker processes (persistent workers otherwise live until garbage collection)."""
        if self.loader is not None and getattr(self.loader, "_iterator", None) is not None:
            self.loader._iterator._shutdown_workers()
            self.loader._iterator = None


def _no_offset(offset: int) -> None:
    if offset:
        raise ConfigError("data.name: a number of ranks that changed in the middle of an epoch (elastic) "
                          "is only supported for in-memory tensor data sets")


def eval_loader(dataset: Dataset, batch_size: int, rank: int, size: int, cfg: DataConfig,
                device: torch.device, seed: int) -> DataLoader:
    """Evaluation batches of a data set that is not in-memory tensors: a disjoint, unpadded
    slice per rank (all of a rank-local data set), through workers like training."""
    from .data import eval_slice

    part = range(len(dataset)) if getattr(dataset, "rank_local", False) else eval_slice(len(dataset), rank, size)
    subset = torch.utils.data.Subset(dataset, list(part))
    return WorkerLoader(subset, batch_size=batch_size, shuffle=False, **loader_kwargs(cfg, device, seed, rank, subset))


def is_fast_path(dataset: Dataset) -> bool:
    """In-memory tensors shared by every rank: batches are indexed, no loader is needed."""
    return isinstance(dataset, TensorDataset) and not getattr(dataset, "rank_local", False)


def make_batches(dataset: Dataset, batch_size: int, rank: int, size: int, seed: int, cfg: DataConfig,
                 device: torch.device = torch.device("cpu")):
    """This rank's training batches: the tensor fast path, or the persistent pipeline."""
    if is_fast_path(dataset):
        from .data import ShardedBatches

        return ShardedBatches(dataset, batch_size, rank, size, seed, cfg.shuffle, cfg.drop_last)
    return LoaderBatches(dataset, batch_size, rank, size, seed, cfg, device)
