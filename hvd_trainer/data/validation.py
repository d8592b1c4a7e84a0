"""What can be wrong with data, found before (or while) a rank trains on it.

The leaf of :mod:`hvd_trainer.data`: it imports nothing else of the package, and no torch at
import time. Every error here is a one-line :class:`~hvd_trainer.config.ConfigError` naming the
config key, which the command line prints and exits 2 on.
"""
from __future__ import annotations

from typing import Any, Iterable, Sequence

import numpy as np

from ..config import ConfigError

REPORT_PATHS = 20  # paths a bad-sample report lists; the count covers all of them


class BadSample(ConfigError):
    """One sample whose file cannot be read (corrupt, truncated, missing, not an image).

    ``str(err)`` is the one line ``<key>: cannot decode <path>: <reason>``; ``path`` is the file.
    Data sets raise it from ``__getitem__``; the loader either stops the job with it
    (``data.bad_samples: error``) or leaves the sample out of its batch (``skip``).
    """

    def __init__(self, message: str, path: str = "") -> None:
        super().__init__(message)
        self.path = path

    @classmethod
    def of(cls, key: str, path: str, err: BaseException) -> "BadSample":
        reason = str(err) or type(err).__name__
        for quoted in (f": {path!r}", f" {path!r}"):  # PIL and OSError repeat the path
            reason = reason.replace(quoted, "")
        return cls(f"{key}: cannot decode {path}: {reason}", path)


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


def check_finite(dataset: Any, name: str) -> None:
    """Raise ``ConfigError("<name>: the data set holds NaN or infinity")`` for an in-memory
    tensor data set (one with ``tensors``) holding a non-finite float; other data sets are read
    lazily and pass. Every rank holding the same data set reaches the same verdict."""
    tensors = getattr(dataset, "tensors", None)
    if not tensors:
        return
    import torch

    if any(t.is_floating_point() and not bool(torch.isfinite(t).all()) for t in tensors):
        raise ConfigError(f"{name}: the data set holds NaN or infinity")


def bad_sample_report(per_rank: Sequence[Iterable[str]]) -> dict[str, Any]:
    """The summary of the samples skipped (``data.bad_samples: skip``), from every rank's
    ``bad_samples()``: ``{"count": distinct paths, "paths": the first 20 in sorted order}``."""
    paths = sorted({p for rank in per_rank for p in rank})
    return {"count": len(paths), "paths": paths[:REPORT_PATHS]}
