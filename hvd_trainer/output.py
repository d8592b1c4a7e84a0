"""Rank-aware output in one place: rank 0 prints and writes metrics; every rank may log to
its own file (``runtime.log_every_rank``)."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Optional

from tqdm import tqdm


class Output:
    def __init__(self, run_dir: str, rank: int, progress: bool, log_every_rank: bool) -> None:
        self.rank = rank
        self.is_main = rank == 0
        self.run_dir = Path(run_dir)
        self.progress_enabled = progress and self.is_main
        self._log = None
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        if log_every_rank:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._log = open(self.run_dir / f"rank{rank}.log", "a", buffering=1)
        self._metrics = open(self.run_dir / "metrics.jsonl", "a", buffering=1) if self.is_main else None

    def print(self, msg: str) -> None:
        """Rank 0 prints (above the progress bar); every rank with a log file records it."""
        if self.is_main:
            tqdm.write(msg, file=sys.stdout)
        self.log_rank(msg)

    def log_rank(self, msg: str) -> None:
        """Only into this rank's own log file (``runtime.log_every_rank``), if it has one."""
        if self._log is not None:
            self._log.write(f"{time.strftime('%H:%M:%S')} rank{self.rank} {msg}\n")

    def metrics(self, record: dict[str, Any]) -> None:
        if self._metrics is not None:
            self._metrics.write(json.dumps(record) + "\n")

    def summary(self, summary: dict[str, Any]) -> None:
        if self.is_main:
            path = self.run_dir / "summary.json"
            tmp = path.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
            tmp.replace(path)

    def progress(self, total: int, desc: str, initial: int = 0) -> "Progress":
        return Progress(total, desc, initial, self.progress_enabled)

    def close(self) -> None:
        for f in (self._log, self._metrics):
            if f is not None:
                f.close()


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
