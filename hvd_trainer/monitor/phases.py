"""Where a step's time goes on this rank, cheap enough to be always on: contiguous laps on
``time.perf_counter``, so the parts sum to the step's time by construction and nothing is
counted twice. The loop opens and closes each step; the strategy marks its phases inside."""
from __future__ import annotations

import contextlib
import time
from typing import Optional

STEP_PARTS = ("data", "compute", "exchange", "optimizer", "other")
"""data: blocked on the next batch; compute: forward and backward; exchange: blocked in the
gradient exchange after backward; optimizer: the update; other: the rest of the step
(checkpoint, stop agreement, bookkeeping)."""


class StepPhases:
    """Per-rank totals of each part since the last :meth:`take`. Outside a step (between
    :meth:`end` and :meth:`begin`) laps are ignored, so a strategy's collective used outside
    the loop (a resume's broadcast) is never charged to a step."""

    def __init__(self, clock=time.perf_counter) -> None:
        self._clock = clock
        self._t: Optional[float] = None
        self.totals = dict.fromkeys(STEP_PARTS, 0.0)
        self.eval_s = 0.0
        self.steps = 0

    def begin(self) -> None:
        self._t = self._clock()

    def lap(self, part: str, at: Optional[float] = None) -> None:
        """Charge the time since the last mark to ``part``. ``at``: an earlier instant at
        which the part ended (DDP's last bucket ready), the time after it goes to the next
        lap's part."""
        if self._t is None:
            return
        now = self._clock() if at is None else min(max(at, self._t), self._clock())
        self.totals[part] += now - self._t
        self._t = now

    def end(self) -> None:
        """Close the step: what is left since the last lap is ``other``."""
        if self._t is None:
            return
        self.lap("other")
        self._t = None
        self.steps += 1

    @contextlib.contextmanager
    def evaluating(self):
        t0 = self._clock()
        try:
            yield
        finally:
            self.eval_s += self._clock() - t0

    def take(self) -> dict[str, float]:
        """This period's totals (seconds, and ``steps``), and start a new period."""
        out = {f"{p}_s": v for p, v in self.totals.items()}
        out["eval_s"], out["steps"] = self.eval_s, self.steps
        self.totals = dict.fromkeys(STEP_PARTS, 0.0)
        self.eval_s, self.steps = 0.0, 0
        return out


def per_step(totals: dict[str, float]) -> dict[str, float]:
    """Seconds per step for the step parts, and ``step_s`` their sum; ``eval_s`` is kept whole."""
    n = max(1, int(totals.get("steps", 0)))
    out = {f"{p}_s": totals.get(f"{p}_s", 0.0) / n for p in STEP_PARTS}
    out["step_s"] = sum(out[f"{p}_s"] for p in STEP_PARTS)
    out["eval_s"] = totals.get("eval_s", 0.0)
    return out


def mean_over(rows: list[dict[str, float]], keys) -> dict[str, float]:
    """The mean of each key over ranks' rows (keys missing in a row count as absent)."""
    out = {}
    for k in keys:
        vals = [r[k] for r in rows if r.get(k) is not None]
        out[k] = sum(vals) / len(vals) if vals else 0.0
    return out
