"""Pipeline schedules as pure rules: the order of one stage's forward ("F") and backward ("B")
passes over a step's microbatches.

GPipe runs every forward, then every backward: simple, and each stage holds all ``m``
microbatches' activations at its peak. 1F1B (PipeDream-flush) runs ``stages - stage - 1``
forwards to fill the pipe, then alternates one forward with one backward, then drains: the same
bubble, ``(P - 1) / (m + P - 1)`` of the step, but at most ``P - stage`` microbatches in flight.
Both run backwards in microbatch order, so the last backward of a step is microbatch ``m - 1``.

:func:`simulate` plays the schedules of all stages against each other (a stage waits for its
input from the neighbour), so the tests can show they never deadlock and what they cost.
"""
from __future__ import annotations

from dataclasses import dataclass

Action = tuple[str, int]  # ("F" | "B", microbatch)

SCHEDULES = ("gpipe", "1f1b")


def actions(schedule: str, stage: int, stages: int, microbatches: int) -> list[Action]:
    m = microbatches
    if schedule == "gpipe":
        return [("F", i) for i in range(m)] + [("B", i) for i in range(m)]
    if schedule == "1f1b":
        warmup = min(stages - stage - 1, m)
        out = [("F", i) for i in range(warmup)]
        for i in range(m - warmup):
            out += [("F", warmup + i), ("B", i)]
        return out + [("B", i) for i in range(m - warmup, m)]
    raise ValueError(f"unknown schedule {schedule!r}")


@dataclass
class Simulation:
    finish: int                # time units until the last action ends (a pass takes 1 unit)
    peak_in_flight: list[int]  # per stage: most microbatches forwarded but not yet backwarded

    def efficiency(self, microbatches: int, stages: int, backward_cost: int = 1) -> float:
        """Busy time of one stage over the whole span."""
        return microbatches * (1 + backward_cost) / self.finish


def simulate(schedule: str, stages: int, microbatches: int, backward_cost: int = 1) -> Simulation:
    """Run every stage's actions, each as soon as its input exists: F(i) on stage s needs F(i)
    done on s-1, B(i) needs B(i) done on s+1 (and the last stage's own F(i)). Raises
    RuntimeError on a deadlock."""
    plans = [actions(schedule, s, stages, microbatches) for s in range(stages)]
    done: dict[tuple[int, str, int], int] = {}  # (stage, kind, micro) -> time it ended
    pos, clock = [0] * stages, [0] * stages
    in_flight, peak = [0] * stages, [0] * stages
    while any(p < len(plan) for p, plan in zip(pos, plans)):
        progressed = False
        for s, plan in enumerate(plans):
            if pos[s] == len(plan):
                continue
            kind, i = plan[pos[s]]
            need = [(s - 1, "F", i)] if kind == "F" and s > 0 else []
            if kind == "B":
                need = [(s, "F", i)] + ([(s + 1, "B", i)] if s < stages - 1 else [])
            if not all(n in done for n in need):
                continue
            start = max([clock[s]] + [done[n] for n in need])
            clock[s] = done[(s, kind, i)] = start + (1 if kind == "F" else backward_cost)
            in_flight[s] += 1 if kind == "F" else -1
            peak[s] = max(peak[s], in_flight[s])
            pos[s] += 1
            progressed = True
        if not progressed:
            raise RuntimeError(f"{schedule} deadlocks at positions {pos}")
    return Simulation(max(clock), peak)


def bubble_efficiency(stages: int, microbatches: int) -> float:
    """The schedule's ideal efficiency, ``m / (m + P - 1)`` (GPipe and 1F1B alike)."""
    return microbatches / (microbatches + stages - 1)
