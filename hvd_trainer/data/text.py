"""Plain text as byte tokens (``data.name: text``): no tokenizer, a vocabulary of 256.

The files of ``data.path`` (a glob, sorted) are read as one byte stream, or by default the
``.py`` sources of Python's standard library, which every machine with Python has. The last
``test_fraction`` of the stream is held out as one contiguous piece, so no window of the
training part overlaps a held-out byte. Each part is cut into non-overlapping windows of
``seq_len + 1`` bytes: ``x`` the first ``seq_len``, ``y`` the same shifted by one.

The summary reports the unigram baseline: the held-out perplexity of byte frequencies counted
on the training part (add-one smoothed), which a language model must beat to have learnt more
than how often each byte occurs.

Every rank reads the same files and gets the same splits. The default text comes from this
rank's Python installation: ranks on hosts with different Pythons would read different text
(``text_sha256`` in the summary tells).
"""
from __future__ import annotations

import glob
import hashlib
import os
import sysconfig
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch
from torch.utils.data import TensorDataset

from ..config import ConfigError, DataConfig

VOCAB = 256
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}  # installed packages are not the stdlib


def stdlib_sources(root: Optional[str] = None) -> Iterator[Path]:
    """The standard library's ``.py`` files, depth first in sorted name order, listed lazily so
    a small ``text_bytes`` lists little of the tree. Left out: installed packages, and the
    generated table of this build's settings (``_sysconfigdata*``), which is no source text and
    differs from one installation to the next."""
    base = Path(root or sysconfig.get_paths()["stdlib"])
    try:
        entries = sorted(os.scandir(base), key=lambda e: e.name)
    except OSError:
        return
    for entry in entries:
        if entry.is_dir(follow_symlinks=False):
            if entry.name not in _SKIP_DIRS:
                yield from stdlib_sources(entry.path)
        elif entry.name.endswith(".py") and not entry.name.startswith("_sysconfigdata") and entry.is_file():
            yield Path(entry.path)


def text_files(pattern: str) -> list[Path]:
    """The files a ``data.path`` glob matches (``**`` recurses), sorted; folders left out."""
    return [Path(p) for p in sorted(glob.glob(pattern, recursive=True)) if Path(p).is_file()]


def read_bytes(files, limit: int) -> tuple[np.ndarray, list[str]]:
    """The files' bytes concatenated, at most ``limit`` (0: all); and the files read (the last
    perhaps in part)."""
    chunks, used, total = [], [], 0
    for path in files:
        if limit and total >= limit:
            break
        try:
            data = path.read_bytes()
        except OSError as err:
            raise ConfigError(f"data.path: cannot read {path} ({err.strerror or err})") from None
        if limit:
            data = data[:limit - total]
        chunks.append(data)
        used.append(str(path))
        total += len(data)
    return np.frombuffer(b"".join(chunks), dtype=np.uint8), used


def windows(stream: np.ndarray, seq_len: int) -> TensorDataset:
    """Non-overlapping windows of ``seq_len + 1`` bytes as int64 (x, y = x shifted by one)."""
    n = len(stream) // (seq_len + 1)
    w = torch.from_numpy(stream[:n * (seq_len + 1)].astype(np.int64)).view(n, seq_len + 1)
    return TensorDataset(w[:, :-1].contiguous(), w[:, 1:].contiguous())


def unigram_perplexity(train: np.ndarray, held_out: np.ndarray) -> float:
    """exp of the mean negative log-likelihood of ``held_out`` bytes under the byte frequencies
    of ``train``, each count plus one (no byte has probability zero)."""
    counts = np.bincount(train, minlength=VOCAB).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(np.exp(-logp[held_out].mean()))


def build_text(cfg: DataConfig) -> tuple[TensorDataset, TensorDataset, dict]:
    """(train, test, summary info) for ``data.name: text``; the same on every rank."""
    if cfg.path:
        files, source = text_files(cfg.path), cfg.path
        if not files:
            raise ConfigError(f"data.path: no file matches {cfg.path}")
    else:
        files, source = stdlib_sources(), f"python stdlib ({sysconfig.get_paths()['stdlib']})"
    stream, used = read_bytes(files, cfg.text_bytes)
    n_test = int(round(len(stream) * cfg.test_fraction))
    train_bytes, test_bytes = stream[:len(stream) - n_test], stream[len(stream) - n_test:]
    train, test = windows(train_bytes, cfg.seq_len), windows(test_bytes, cfg.seq_len)
    if len(train) == 0 or len(test) == 0:
        raise ConfigError(f"data.path: {len(stream)} bytes of text leave no window of seq_len + 1 = "
                          f"{cfg.seq_len + 1} bytes in the {'training' if not len(train) else 'held-out'} "
                          f"part (test_fraction {cfg.test_fraction})")
    info = {"text_source": source, "text_files": used, "text_bytes": len(stream),
            "text_sha256": hashlib.sha256(stream.tobytes()).hexdigest()[:16],
            "train_tokens": int(train.tensors[1].numel()), "test_tokens": int(test.tensors[1].numel()),
            "unigram_perplexity": round(unigram_perplexity(train_bytes, test.tensors[1].numpy().ravel()), 4)}
    return train, test, info
