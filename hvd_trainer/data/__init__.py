"""Data: where samples come from, how they are dealt to ranks, and how they are loaded.

    validation  the leaf: checks of arrays and tensors, unreadable samples (BadSample)
    sharding    which samples each rank gets (ShardedBatches, eval slices, shard assignment)
    datasets    data sets users have (ImageFolder, NpzShards) and writers for tests
    text        plain text as byte tokens, and its unigram baseline
    sources     the built-in sources and build_splits
    workers     how loader worker processes start
    samples     what a worker does per batch: per-sample seeds, unreadable samples set aside
    loaders     per-rank loader pipelines (make_batches, eval_loader)

Each module imports only those above it in this list (tests/unit/test_imports.py checks there is
no cycle). The names below are imported on first use, so ``import hvd_trainer.data`` (or any one
module of it) does not load the others, nor torch.
"""
from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # what the lazy names are, for readers and type checkers
    from .loaders import data_summary, eval_loader, is_fast_path, make_batches
    from .sharding import bind_rank_local, eval_batches
    from .sources import Splits, build_splits
    from .validation import bad_sample_report, check_finite

_HOME = {"build_splits": "sources", "Splits": "sources", "eval_batches": "sharding",
         "bind_rank_local": "sharding", "eval_loader": "loaders", "is_fast_path": "loaders",
         "make_batches": "loaders", "data_summary": "loaders", "check_finite": "validation",
         "bad_sample_report": "validation"}
__all__ = sorted(_HOME)


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f"{__name__}.{_HOME[name]}"), name)
    globals()[name] = value  # looked up once
    return value
