"""Rank-aware output in one place: rank 0 prints and writes metrics; every rank may log to
its own file (``runtime.log_every_rank``)."""
from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional

from tqdm import tqdm

from .runtime import world


class Output:
    def __init__(self, run_dir: str, rank: int, progress: bool, log_every_rank: bool) -> None:
        self.rank = rank
        self.is_main = rank == 0
        scope = world.scope()  # several runs share one output (hvd-tune): say whose line it is
        self.prefix = f"[{scope.label}] " if scope is not None else ""
        self.run_dir = Path(run_dir)
        self.progress_enabled = progress and self.is_main
        self._log = None
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        if log_every_rank:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._log = open(self.run_dir / f"rank{rank}.log", "a", buffering=1)
        self._metrics = open(self.run_dir / "metrics.jsonl", "a", buffering=1) if self.is_main else None
        self._progress = progress

    def renumber(self, rank: int) -> None:
        """This process has another rank now (Horovod elastic): rank 0 is whoever holds it."""
        self.rank, self.is_main = rank, rank == 0
        self.progress_enabled = self._progress and self.is_main
        if self.is_main and self._metrics is None:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._metrics = open(self.run_dir / "metrics.jsonl", "a", buffering=1)

    def print(self, msg: str) -> None:
        """Rank 0 prints (above the progress bar); every rank with a log file records it."""
        if self.is_main:
            tqdm.write(self.prefix + msg, file=sys.stdout)
        self.log_rank(msg)

    def log_rank(self, msg: str) -> None:
        """Only into this rank's own log file (``runtime.log_every_rank``), if it has one."""
        if self._log is not None:
            self._log.write(f"{time.strftime('%H:%M:%S')} rank{self.rank} {msg}\n")

    def metrics(self, record: dict[str, Any]) -> None:
        if self._metrics is not None:
            self._metrics.write(json.dumps(_finite(record), allow_nan=False) + "\n")

    def forget_metrics_after(self, step: int) -> None:
        """A resumed run retrains what came after ``step``: drop those rows, so every step
        appears once in metrics.jsonl (rank 0)."""
        if self._metrics is None:
            return
        self._metrics.close()
        path = self.run_dir / "metrics.jsonl"
        kept = [line for line in path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        _write_atomically(path, "".join(line + "\n" for line in kept))
        self._metrics = open(path, "a", buffering=1)

    def summary(self, summary: dict[str, Any]) -> None:
        """summary.json, atomically; NaN and infinity are written as null (valid JSON)."""
        if self.is_main:
            _write_atomically(self.run_dir / "summary.json",
                              json.dumps(_finite(summary), indent=2, sort_keys=True, allow_nan=False) + "\n")

    def progress(self, total: int, desc: str, initial: int = 0) -> "Progress":
        return Progress(total, desc, initial, self.progress_enabled)

    def close(self) -> None:
        for f in (self._log, self._metrics):
            if f is not None:
                f.close()


def _finite(obj: Any) -> Any:
    """``obj`` with every non-finite float replaced by None (JSON has no NaN)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    tmp.replace(path)


class Progress:
    """A tqdm bar on rank 0 showing loss and samples/s; a no-op elsewhere."""

    def __init__(self, total: int, desc: str, initial: int, enabled: bool) -> None:
        self.bar: Optional[tqdm] = tqdm(total=total, initial=initial, desc=desc, leave=False,
                                        mininterval=0.5, file=sys.stdout, dynamic_ncols=True) if enabled else None

    def update(self, loss: float, samples_per_sec: float) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.4f}", sps=f"{samples_per_sec:.0f}", refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
