"""How samples are dealt to ranks.

Training data shared by every rank is sharded with ``DistributedSampler`` (re-seeded by
``set_epoch`` every epoch); an uneven last shard is padded by the sampler, so every rank runs the
same number of steps and no rank waits in a collective the others never enter. Evaluation is
split into contiguous, disjoint slices without padding: every held-out sample is counted exactly
once. Rank-local data sets (shards) are dealt by file (:func:`assign_shards`) and ordered per rank
(:func:`local_order`).

In-memory tensor data sets are batched by indexing (``x[idx]``), not by collating one sample at
a time through a DataLoader: on a small model the per-sample path costs more than the step.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from torch.utils.data import DistributedSampler, TensorDataset

Allgather = Callable[[Any], list]


class ShardedBatches:
    """Per-rank training batches of in-memory tensors shared by every rank, one epoch at a time.

    All data-parallel ranks must construct it with the same data set, batch size and seed;
    each then sees a disjoint shard, and all see the same number of batches per epoch.
    """

    def __init__(self, dataset: TensorDataset, batch_size: int, rank: int, size: int,
                 seed: int, shuffle: bool = True, drop_last: bool = False) -> None:
        self.dataset, self.batch_size, self.drop_last = dataset, batch_size, drop_last
        self.sampler = DistributedSampler(dataset, num_replicas=size, rank=rank,
                                          shuffle=shuffle, seed=seed, drop_last=False)
        self._tensors = dataset.tensors

    def __len__(self) -> int:
        return self.batches_in(0)

    def batches_in(self, offset: int) -> int:
        """Batches per rank in an epoch whose first ``offset`` samples were already trained on."""
        size = self.sampler.num_replicas
        n = self.sampler.num_samples if offset == 0 else -(-(len(self.dataset) - offset) // size)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def _indices(self, epoch: int, offset: int) -> torch.Tensor:
        self.sampler.set_epoch(epoch)
        if offset == 0:
            return torch.as_tensor(list(iter(self.sampler)), dtype=torch.long)
        # A membership change (Horovod elastic) mid-epoch: the samples of this epoch's global
        # order not yet trained on are shared anew among the ranks there are now, the way the
        # sampler shares a whole epoch (strided, padded by repeating the first ones).
        s = self.sampler
        if s.shuffle:
            g = torch.Generator()
            g.manual_seed(s.seed + epoch)
            order = torch.randperm(len(self.dataset), generator=g)
        else:
            order = torch.arange(len(self.dataset))
        rest = order[offset:]
        pad = -len(rest) % s.num_replicas
        rest = torch.cat([rest, rest[:pad]]) if pad else rest
        return rest[s.rank::s.num_replicas]

    def epoch(self, epoch: int, skip: int = 0, offset: int = 0) -> Iterator[tuple[torch.Tensor, ...]]:
        """Batches of ``epoch``, starting after the first ``skip`` (for an exact resume); ``offset``:
        samples of the epoch's global order trained on before the ranks changed (elastic)."""
        idx = self._indices(epoch, offset)
        for b in range(skip, self.batches_in(offset)):
            chunk = idx[b * self.batch_size:(b + 1) * self.batch_size]
            yield tuple(t[chunk] for t in self._tensors)

    def bad_samples(self) -> list[str]:
        """In-memory tensors were checked when loaded: nothing is ever skipped."""
        return []


def eval_slice(n: int, rank: int, size: int) -> range:
    """Contiguous, disjoint, unpadded slice of ``range(n)`` for ``rank``; the slices cover it once."""
    per, extra = divmod(n, size)
    start = rank * per + min(rank, extra)
    return range(start, start + per + (1 if rank < extra else 0))


def eval_batches(dataset: TensorDataset, batch_size: int, rank: int, size: int) -> Iterator[tuple[torch.Tensor, ...]]:
    """This rank's held-out batches of in-memory tensors (other data sets: ``eval_loader``)."""
    part = eval_slice(len(dataset), rank, size)
    for s in range(part.start, part.stop, batch_size):
        yield tuple(t[s:min(s + batch_size, part.stop)] for t in dataset.tensors)


def local_order(n: int, target: int, seed: int, epoch: int, rank: int, shuffle: bool) -> torch.Tensor:
    """A rank-local epoch order: ``target`` indices of ``range(n)``, shuffled per (seed, epoch,
    rank); repeats its own samples when ``target > n`` (pad), stops early when ``target < n``."""
    if shuffle:
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch * 7919 + rank)
        order = torch.randperm(n, generator=g)
    else:
        order = torch.arange(n)
    reps = -(-target // n)
    return order.repeat(reps)[:target]


def assign_shards(files: Sequence[str], size: int) -> list[list[str]]:
    """Shards per rank, balanced by file size (``stat`` only: nothing is opened): the largest
    file goes to the rank with the fewest bytes so far (ties: the lower rank). Every rank
    computes the same assignment from the same listing."""
    load, out = [0] * size, [[] for _ in range(size)]
    for path in sorted(files, key=lambda f: (-os.path.getsize(f), f)):
        r = min(range(size), key=lambda i: (load[i], i))
        out[r].append(path)
        load[r] += os.path.getsize(path)
    return [sorted(part) for part in out]


def bind_rank_local(datasets: Iterable[Any], rank: int, size: int, allgather: Allgather) -> None:
    """Every training rank (collective): open each rank-local data set's part on this rank
    (those with a ``bind(rank, size, allgather)``, e.g. ``NpzShards``); others are left alone."""
    for ds in datasets:
        if hasattr(ds, "bind"):
            ds.bind(rank, size, allgather)
