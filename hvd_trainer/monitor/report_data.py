"""What ``hvd-report`` reads from a run dir: the metrics.jsonl rows and summary.json.

A run dir may be incomplete (a run still going, or one stopped mid-write) or from an older
version (rows without "time", "ranks" or "stragglers", no summary); whatever is missing is left
out of the report, never guessed. Only a missing dir or metrics.jsonl is an error.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

STEP_PARTS = ("data", "compute", "exchange", "optimizer", "other")


class RunDirError(Exception):
    """A run dir with nothing to report on; the message names it."""


def number(value: Any) -> Optional[float]:
    """``value`` as a finite float, else None (missing, null, NaN, or not a number)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


@dataclass
class Run:
    path: Path
    name: str  # the label in plots and on the page
    rows: list[dict[str, Any]]  # one per epoch, by step
    summary: dict[str, Any] = field(default_factory=dict)  # {} when absent or unreadable
    notes: list[str] = field(default_factory=list)  # what was missing or skipped, for the page

    def ranks(self) -> list[dict[str, Any]]:
        """Per-rank figures over the whole run (the summary's), else the last epoch's that has them."""
        if self.summary.get("ranks"):
            return self.summary["ranks"]
        for row in reversed(self.rows):
            if row.get("ranks"):
                return row["ranks"]
        return []

    def stragglers(self) -> list[dict[str, Any]]:
        """Every straggler warning, each with its epoch: the rows', else the summary's (a run
        whose early rows were rolled back by a resume still has them in its summary)."""
        found = [dict(s, epoch=row.get("epoch")) for row in self.rows for s in row.get("stragglers") or []]
        return found or [dict(s) for s in self.summary.get("stragglers") or []]

    def breakdown(self) -> Optional[dict[str, float]]:
        """Mean seconds per step of each step part: the summary's, else the rows' weighted by
        their epoch's steps (a resumed epoch is shorter). None when no row has times."""
        summary = self.summary.get("time_breakdown") or {}
        if all(number(summary.get(f"{p}_s")) is not None for p in STEP_PARTS):
            return {p: summary[f"{p}_s"] for p in STEP_PARTS}
        totals, weight, previous = dict.fromkeys(STEP_PARTS, 0.0), 0.0, 0.0
        for row in self.rows:
            step = number(row.get("step")) or previous
            steps, previous = max(1.0, step - previous), step
            times = row.get("time") or {}
            if all(number(times.get(f"{p}_s")) is not None for p in STEP_PARTS):
                weight += steps
                for p in STEP_PARTS:
                    totals[p] += steps * times[f"{p}_s"]
        return {p: t / weight for p, t in totals.items()} if weight else None

    def breakdown_percent(self) -> Optional[dict[str, float]]:
        """The breakdown as % of the step (the five parts make the step, so they add to 100)."""
        parts = self.breakdown()
        total = sum(parts.values()) if parts else 0.0
        return {p: 100.0 * s / total for p, s in parts.items()} if total > 0 else None

    def final(self, summary_key: str, row_key: str) -> Optional[float]:
        """A figure of the summary, else of the last row (a run without summary stopped early)."""
        value = number(self.summary.get(summary_key))
        return value if value is not None or not self.rows else number(self.rows[-1].get(row_key))


def load_run(path: Path, name: Optional[str] = None) -> Run:
    """Read one run dir; :class:`RunDirError` when there is no dir or no metrics row in it."""
    path = Path(path)
    if not path.is_dir():
        raise RunDirError(f"{path}: no such run dir")
    metrics = path / "metrics.jsonl"
    if not metrics.is_file():
        raise RunDirError(f"{path}: no metrics.jsonl in this run dir (no epoch finished yet?)")
    by_step: dict[float, dict[str, Any]] = {}
    bad = 0
    for line in metrics.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:  # a line cut short by a run still writing, or killed mid-write
            bad += 1
            continue
        if not isinstance(row, dict) or number(row.get("step")) is None:
            bad += 1
            continue
        by_step[row["step"]] = row  # rows are unique by step; should one repeat, the later wins
    if not by_step:
        raise RunDirError(f"{path}: metrics.jsonl has no complete row")
    run = Run(path, name or path.resolve().name, [by_step[s] for s in sorted(by_step)])
    if bad:
        run.notes.append(f"{bad} unreadable line(s) of metrics.jsonl skipped")
    try:
        summary = json.loads((path / "summary.json").read_text(encoding="utf-8"))
        run.summary = summary if isinstance(summary, dict) else {}
    except FileNotFoundError:
        run.notes.append("no summary.json (run still going, or stopped early): figures from the last epoch")
    except (OSError, ValueError) as err:
        run.notes.append(f"summary.json unreadable ({err}): figures from the last epoch")
    if not any(row.get("ranks") for row in run.rows) and not run.summary.get("ranks"):
        run.notes.append("no per-rank figures (older run): no time breakdown or memory")
    return run


def load_runs(paths: Sequence[Path]) -> list[Run]:
    """Every run dir in order, named by its folder; two folders of the same name (a/run, b/run)
    are named by their path instead, so the plots' legends tell them apart."""
    names = [Path(p).resolve().name for p in paths]
    return [load_run(p, n if names.count(n) == 1 else str(p)) for p, n in zip(paths, names)]
