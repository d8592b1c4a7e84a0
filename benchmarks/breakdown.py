"""Why a trainer variant falls short of the limit: its per-step time breakdown (the trainer's
monitor writes it into every metrics.jsonl row) set against the limit's own compute and update,
and a one-line verdict naming the part that makes most of the gap.

The limit does forward+backward and the update and nothing else, so a trainer step's excess
over the limit's step splits into three causes, which add up to the whole gap:

  exchange   the trainer's ``exchange_s``: blocked waiting for the gradient exchange;
  compute    ``compute_s`` minus the limit's: forward+backward ran slower than in the limit,
             i.e. the exchange's threads took the cores from it (one core per rank here);
  overhead   ``data_s + optimizer_s + other_s`` minus the limit's update and loop.
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any, Optional

PARTS = ("data", "compute", "exchange", "optimizer", "other")
KEYS = tuple(f"{p}_s" for p in PARTS) + ("step_s",)
AT_LIMIT = 0.02  # a gap below this fraction of the limit's step is within the rounds' noise
CAUSES = {
    "exchange": "waiting for the exchange",
    "compute": "compute slowed by the exchange sharing the cores",
    "overhead": "overhead (data + optimizer + other)",
}
AT_LIMIT_TEXT = "at the limit"


def read_run(run_dir: str) -> Optional[dict[str, float]]:
    """The breakdown of a trainer run's timed epochs (every epoch after the first, the warm-up,
    as :func:`core.epoch_throughputs`): seconds per step of each part and the step, mean over
    ranks and epochs, and ``cpu_util`` (cores busy per rank). ``None`` for a run whose rows
    carry no breakdown (a trainer older than the monitor). Rank 0's file: rank 0 (or the
    parent of the job, after it) reads it."""
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in rows[1:] if r.get("time")]
    if not timed:
        return None
    out = {k: statistics.fmean(r["time"].get(k, 0.0) for r in timed) for k in KEYS}
    utils = [statistics.fmean(x["cpu_util"] for x in r["ranks"]) for r in timed
             if r.get("ranks") and all(x.get("cpu_util") is not None for x in r["ranks"])]
    out["cpu_util"] = statistics.fmean(utils) if utils else None
    return out


def median_over(samples: list[Optional[dict[str, Any]]]) -> Optional[dict[str, Any]]:
    """Each key's median over rounds (rounds without a breakdown, or without the key, left out);
    ``rounds``: how many rounds had one."""
    have = [s for s in samples if s]
    if not have:
        return None
    out: dict[str, Any] = {}
    for k in have[0]:
        vals = [s[k] for s in have if s.get(k) is not None]
        out[k] = statistics.median(vals) if vals else None
    out["rounds"] = len(have)
    return out


def shares(t: dict[str, float]) -> dict[str, float]:
    """Each part's fraction of the step."""
    step = t["step_s"]
    return {p: (t.get(f"{p}_s") or 0.0) / step if step > 0 else 0.0 for p in PARTS}


def limit_time(entry: dict[str, Any], ranks: int, batch: int) -> dict[str, float]:
    """The limit's step, compute and update per step on one rank: its own laps when it timed
    them, else only its step (from samples/s), all of it counted as compute."""
    if entry.get("time"):
        return dict(entry["time"])
    step = ranks * batch / entry["median"]
    return {"step_s": step, "compute_s": step, "optimizer_s": 0.0, "other_s": 0.0}


def explain(t: dict[str, float], limit: dict[str, float]) -> dict[str, Any]:
    """The gap of a trainer variant's step ``t`` to the limit's step, split into its causes
    (seconds per step; they add up to the gap), and the verdict."""
    lim_step = limit["step_s"]
    causes = {"exchange": t["exchange_s"],
              "compute": t["compute_s"] - limit["compute_s"],
              "overhead": t["data_s"] + t["optimizer_s"] + t["other_s"] - (lim_step - limit["compute_s"])}
    gap = t["step_s"] - lim_step
    key = verdict(gap / lim_step, causes)
    return {"gap_s": gap, "gap": gap / lim_step, **{f"{c}_s": v for c, v in causes.items()},
            "compute_vs_limit_compute": t["compute_s"] / limit["compute_s"],
            "compute_vs_limit_step": t["compute_s"] / lim_step,
            "verdict": key, "text": CAUSES.get(key, AT_LIMIT_TEXT)}


def verdict(gap: float, causes: dict[str, float]) -> str:
    """``"at-limit"`` when the step is within :data:`AT_LIMIT` of the limit's (``gap``: the
    excess as a fraction of the limit's step), else the cause (a key of :data:`CAUSES`) that
    makes the largest part of the excess."""
    if gap < AT_LIMIT:
        return "at-limit"
    return max(CAUSES, key=lambda c: causes.get(c, 0.0))


def markdown(ranks: dict[str, dict[str, Any]]) -> str:
    """The breakdown table of the throughput section and one verdict line per trainer variant."""
    rows, verdicts = [], []
    for n, per in ranks.items():
        for name, q in per.items():
            t = q.get("time")
            if not t:
                continue
            sh = shares(t)
            g = q.get("gap")
            util = f"{t['cpu_util']:.2f}" if t.get("cpu_util") is not None else ""
            if g:
                against = (g["compute_vs_limit_compute"], g["compute_vs_limit_step"])
            else:  # the limit against itself; a variant without a limit to compare: blank
                against = (1.0, t["compute_s"] / t["step_s"]) if name == "limit" else (None, None)
            vs = " | ".join("" if v is None else f"{v:.3f}" for v in against)
            rows.append(f"| {name} | {n} | {1e3 * t['step_s']:.1f} | " + " | ".join(f"{100 * sh[p]:.1f}%" for p in PARTS)
                        + f" | {vs} | {util} |")
            if g:
                verdicts.append(verdict_line(name, n, g))
    if not rows:
        return ""
    return "\n".join([
        "Where a step's time goes (the trainer's own breakdown, issue 18; the limit times its "
        "forward+backward and its update itself): per variant and rank count, the step and each part's "
        "share of it, seconds per step averaged over ranks and timed epochs, then the median over rounds "
        "(the parts' medians need not add up to exactly 100%). `compute / limit's`: the variant's "
        "forward+backward per step over the limit's forward+backward, and over the limit's whole step "
        "(above 1: the exchange's threads slowed compute down). CPU util: cores busy per rank.", "",
        "| variant | ranks | step ms | data | compute | exchange | optimizer | other | compute / limit's compute | "
        "compute / limit's step | CPU util |",
        "|---|---|---|---|---|---|---|---|---|---|---|", *rows, "",
        f"Why each trainer variant is slower than the limit (gap: its step minus the limit's; under "
        f"{AT_LIMIT:.0%} of the limit's step counts as at the limit):", "", *verdicts])


def verdict_line(name: str, ranks: str, g: dict[str, Any]) -> str:
    detail = ", ".join(f"{c} {1e3 * g[f'{c}_s']:+.1f} ms" for c in CAUSES)
    return (f"- **{name}**, {ranks} rank{'s' if ranks != '1' else ''}: gap {1e3 * g['gap_s']:+.1f} ms "
            f"({g['gap']:+.1%}): {g['text']} ({detail}).")
