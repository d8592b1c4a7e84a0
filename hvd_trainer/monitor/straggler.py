"""Which rank held the others back: a pure rule over one epoch's per-rank step parts.

Under synchronous data parallelism a slow rank shows in its own compute or data wait, while
the fast ranks' extra time shows as exchange wait (they wait for it); so only the parts a
rank causes itself are compared with the median over ranks. Pipeline stages do different work
(and a stage's compute includes waiting for its neighbours), so a rank is compared only with
the ranks holding the same stage."""
from __future__ import annotations

from statistics import median
from typing import Any

OWN_PARTS = ("data", "compute")


def find_stragglers(ranks: list[dict[str, Any]], factor: float, min_excess_s: float) -> list[dict[str, Any]]:
    """The ranks whose per-step ``data_s`` or ``compute_s`` exceeds the median over ranks by
    ``factor`` and by at least ``min_excess_s`` (so a 0.1 ms data wait twice a 0.05 ms one is
    not news). One entry per (rank, part), slowest first. Needs three ranks or more to say
    who is slow with a median that the slow rank does not own; two ranks compare each with
    their mean, which a slow rank moves by half its excess."""
    stages = sorted({r.get("stage", 0) for r in ranks})
    if len(stages) > 1:
        found = [s for stage in stages
                 for s in find_stragglers([r for r in ranks if r.get("stage", 0) == stage], factor, min_excess_s)]
        return sorted(found, key=lambda s: -s["seconds"] + s["median"])
    found = []
    if len(ranks) < 2:
        return found
    for part in OWN_PARTS:
        key = f"{part}_s"
        values = [r.get(key) or 0.0 for r in ranks]
        mid = median(values)
        for r, v in zip(ranks, values):
            if v > factor * mid and v - mid >= min_excess_s:
                found.append({"rank": r["rank"], "host": r.get("host", "?"), "part": part,
                              "ratio": v / mid if mid > 0 else float("inf"), "seconds": v, "median": mid})
    return sorted(found, key=lambda s: -s["seconds"] + s["median"])


def describe(s: dict[str, Any]) -> str:
    ratio = f"{s['ratio']:.2f}x" if s["ratio"] != float("inf") else "far above"
    what = "forward+backward" if s["part"] == "compute" else "data wait"
    return (f"straggler: rank {s['rank']} on {s['host']}: its {what} takes {ratio} the median "
            f"({1000 * s['seconds']:.1f} ms/step against {1000 * s['median']:.1f} ms)")
