"""Data sets and rank sharding.

Training data is sharded with ``DistributedSampler`` (re-seeded by ``set_epoch`` every epoch);
an uneven last shard is padded by the sampler, so every rank runs the same number of steps and
no rank waits in a collective the others never enter. Evaluation is split into contiguous,
disjoint slices without padding: every held-out sample is counted exactly once.

In-memory tensor data sets are batched by indexing (``x[idx]``), not by collating one sample at
a time through a DataLoader: on a small model the per-sample path costs more than the step.
"""
from __future__ import annotations

import gzip
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, TensorDataset

from .config import ConfigError, DataConfig


@dataclass(frozen=True)
class Splits:
    train: Dataset
    test: Dataset
    input_shape: tuple[int, ...]
    num_classes: int


def check_arrays(x: np.ndarray, y: np.ndarray, what: str) -> None:
    """Raise a one-line :class:`ConfigError` for arrays that cannot be a classification set:
    caught when the data is loaded, before any rank trains on it."""
    where = f"data.path: {what}"
    if x.dtype.kind not in "fiub" or x.ndim < 2:
        raise ConfigError(f"{where}: x must be numeric with shape (samples, features...), got {x.dtype} {x.shape}")
    if y.ndim != 1 or y.dtype.kind not in "iub" and not (y.dtype.kind == "f" and np.all(np.mod(y, 1) == 0)):
        raise ConfigError(f"{where}: y must be a 1-D array of integer class labels, got {y.dtype} {y.shape}")
    if len(x) != len(y):
        raise ConfigError(f"{where}: x has {len(x)} samples but y has {len(y)}")
    if len(x) == 0:
        raise ConfigError(f"{where}: no samples")
    if y.min() < 0:
        raise ConfigError(f"{where}: labels must be >= 0, found {y.min()}")
    if x.dtype.kind == "f" and not np.isfinite(x).all():
        bad = int((~np.isfinite(x)).reshape(len(x), -1).any(axis=1).sum())
        raise ConfigError(f"{where}: {bad} samples hold NaN or infinity")


def _split(x: np.ndarray, y: np.ndarray, fraction: float, seed: int):
    order = np.random.default_rng(seed).permutation(len(x))
    n_test = max(1, int(round(len(x) * fraction)))
    test, train = order[:n_test], order[n_test:]
    return x[train], y[train], x[test], y[test]


def _tensors(xtr, ytr, xte, yte) -> Splits:
    xtr_t = torch.as_tensor(np.ascontiguousarray(xtr), dtype=torch.float32)
    xte_t = torch.as_tensor(np.ascontiguousarray(xte), dtype=torch.float32)
    ytr_t = torch.as_tensor(np.asarray(ytr), dtype=torch.long)
    yte_t = torch.as_tensor(np.asarray(yte), dtype=torch.long)
    classes = int(max(ytr_t.max().item(), yte_t.max().item())) + 1
    return Splits(TensorDataset(xtr_t, ytr_t), TensorDataset(xte_t, yte_t), tuple(xtr_t.shape[1:]), classes)


def digits_csv() -> Path:
    """scikit-learn's copy of the 1,797 UCI 8x8 digits (``sklearn/datasets/data/digits.csv.gz``),
    found without importing scikit-learn."""
    spec = importlib.util.find_spec("sklearn")  # a top-level package: located, not executed
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder, "datasets", "data", "digits.csv.gz")
        if path.is_file():
            return path
    raise FileNotFoundError("the digits set comes with scikit-learn: pip install scikit-learn "
                            "(scripts/install.sh installs it)")


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The 1,797 8x8 handwritten digits scikit-learn ships (offline), as (N,1,8,8) in [0,1].

    Read from its CSV (64 pixel values 0..16, then the label) as ``sklearn.datasets.load_digits``
    does, but without importing scikit-learn, which took 0.63 s of a 3.7 s one-epoch
    ``hvd-train digits`` here, in every rank (tests/unit/test_data.py checks the arrays are
    the same as load_digits')."""
    with gzip.open(digits_csv(), "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.float64)
    images = table[:, :-1].reshape(-1, 1, 8, 8)
    return (images / 16.0).astype(np.float32), table[:, -1].astype(np.int64)


def synthetic_arrays(samples: int, shape: list[int], classes: int, seed: int):
    """Seeded, learnable data: labels from a fixed random linear teacher over the inputs."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((samples, *shape)).astype(np.float32)
    teacher = rng.standard_normal((int(np.prod(shape)), classes)).astype(np.float32)
    y = (x.reshape(samples, -1) @ teacher).argmax(axis=1)
    return x, y


def build_splits(cfg: DataConfig, seed: int) -> Splits:
    """Every rank calls this with the same config and seed and gets identical splits (shards:
    the same unopened sets; the trainer binds each rank to its part)."""
    if cfg.name in ("images", "shards"):
        from .datasets import build_images, build_shards

        train, test = build_images(cfg, seed) if cfg.name == "images" else build_shards(cfg)
        return Splits(train, test, (), 0)  # shape and classes: from the data sets themselves
    if cfg.name == "digits":
        x, y = load_digits_arrays()
        return _tensors(*_split(x, y, cfg.test_fraction, seed))
    if cfg.name == "synthetic":
        x, y = synthetic_arrays(cfg.synthetic_samples, cfg.synthetic_shape, cfg.synthetic_classes, seed)
        return _tensors(*_split(x, y, cfg.test_fraction, seed))
    # npz: validated to exist by the config; check its contents here
    try:
        arrays = np.load(cfg.path, allow_pickle=False)
    except Exception as err:  # corrupt or not an npz
        raise ConfigError(f"data.path: cannot read {cfg.path} as .npz ({err})") from None
    keys = set(arrays.files)
    if {"x_train", "y_train", "x_test", "y_test"} <= keys:
        parts = [arrays[k] for k in ("x_train", "y_train", "x_test", "y_test")]
        check_arrays(parts[0], parts[1], "x_train/y_train")
        check_arrays(parts[2], parts[3], "x_test/y_test")
        return _tensors(*parts)
    if {"x", "y"} <= keys:
        x, y = arrays["x"], arrays["y"]
        check_arrays(x, y, "x/y")
        if len(x) < 2:
            raise ConfigError(f"data.path: x/y: {len(x)} sample(s) cannot be split into train and test")
        return _tensors(*_split(x, y, cfg.test_fraction, seed))
    raise ConfigError(f"data.path: {cfg.path} needs arrays x_train,y_train,x_test,y_test or x,y; has {sorted(keys)}")


class ShardedBatches:
    """Per-rank training batches for one epoch at a time.

    All data-parallel ranks must construct it with the same data set, batch size and seed;
    each then sees a disjoint shard, and all see the same number of batches per epoch.
    """

    def __init__(self, dataset: Dataset, batch_size: int, rank: int, size: int,
                 seed: int, shuffle: bool = True, drop_last: bool = False) -> None:
        self.dataset, self.batch_size, self.drop_last = dataset, batch_size, drop_last
        self.sampler = DistributedSampler(dataset, num_replicas=size, rank=rank,
                                          shuffle=shuffle, seed=seed, drop_last=False)
        self._tensors = dataset.tensors if isinstance(dataset, TensorDataset) else None

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
            if self._tensors is not None:
                yield tuple(t[chunk] for t in self._tensors)
            else:
                yield next(iter(DataLoader(torch.utils.data.Subset(self.dataset, chunk.tolist()),
                                           batch_size=len(chunk))))


def eval_slice(n: int, rank: int, size: int) -> range:
    """Contiguous, disjoint, unpadded slice of ``range(n)`` for ``rank``; the slices cover it once."""
    per, extra = divmod(n, size)
    start = rank * per + min(rank, extra)
    return range(start, start + per + (1 if rank < extra else 0))


def eval_batches(dataset: Dataset, batch_size: int, rank: int, size: int) -> Iterator[tuple[torch.Tensor, ...]]:
    part = eval_slice(len(dataset), rank, size)
    if isinstance(dataset, TensorDataset):
        for s in range(part.start, part.stop, batch_size):
            yield tuple(t[s:min(s + batch_size, part.stop)] for t in dataset.tensors)
        return
    sub = torch.utils.data.Subset(dataset, list(part))
    yield from DataLoader(sub, batch_size=batch_size, shuffle=False)


def worker_seed_everything(seed: int, rank: int) -> None:
    """Seed torch, numpy and random; model init uses ``seed`` on every rank (then rank 0 is
    broadcast anyway), the per-rank streams (dropout) use ``seed + rank``."""
    import random

    random.seed(seed + rank)
    np.random.seed((seed + rank) % (2 ** 32))
    torch.manual_seed(seed + rank)

