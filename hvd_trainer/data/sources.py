"""The built-in data sources: the digits set scikit-learn ships, seeded synthetic arrays and a
user's .npz, split into train and test (:func:`build_splits`); folders of images and globs of
shards come from :mod:`hvd_trainer.data.datasets`, byte-level text from :mod:`hvd_trainer.data.text`.

Every rank builds the same splits from the same config and seed; how they are dealt to ranks is
:mod:`hvd_trainer.data.sharding`'s business.
"""
from __future__ import annotations

import gzip
import importlib.util
from dataclasses import dataclass, field
from typing import Any
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset

from ..config import ConfigError, DataConfig
from .datasets import build_images, build_shards
from .text import VOCAB, build_text
from .validation import check_arrays


@dataclass(frozen=True)
class Splits:
    """Train and test sets; ``input_shape``/``num_classes`` are ``()``/0 where the data sets tell
    their own (images, shards). ``info``: what the summary should say about them."""

    train: Dataset
    test: Dataset
    input_shape: tuple[int, ...]
    num_classes: int
    info: dict[str, Any] = field(default_factory=dict)


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
        train, test = build_images(cfg, seed) if cfg.name == "images" else build_shards(cfg)
        return Splits(train, test, (), 0)  # shape and classes: from the data sets themselves
    if cfg.name == "text":
        train, test, info = build_text(cfg)
        return Splits(train, test, (cfg.seq_len,), VOCAB, info)
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
