"""What monitoring costs: the default trainer with its sinks on against the same trainer with
them off, alternating in one run.

The trainer and its job are the throughput section's (``strategy=horovod``, 2 ranks, the same
model, batch and fixed batch of data). The per-step time breakdown is always on (a few clock
reads per step; it cannot be switched off), so the variants differ in the sinks:

  off   runtime.tensorboard=false, no metrics textfile, no port (the defaults)
  on    runtime.tensorboard=true and runtime.metrics_textfile=<temp file>: the TensorBoard
        writer and the Prometheus sink both run (no port is opened)

Each round runs both, the order flipping every round, so drift on a noisy machine falls on
both alike. Two figures per job, each over its timed epochs (every epoch after the first):
``train``, the training loop's samples/s (as the throughput section; the sinks' per-step work
is in it, their per-epoch work is not), and ``wall``, samples per wall second from one epoch's
row to the next, which also holds the epoch's end: evaluation, the breakdown's gather and the
sinks' epoch writes. A round's ratio is on/off of the two jobs' medians; reported: the median
ratio over rounds with its min-max, and each variant's median with its spread.
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from . import breakdown, core
from .core import Bench, BenchError

TITLE = "Monitoring overhead: TensorBoard and Prometheus sinks on against off"
NP = 2
TARGET = 0.98
BASE = ["strategy=horovod"]
VARIANTS = ("off", "on")
FIGURES = ("wall", "train")  # the first is the headline: it holds every cost of the sinks


def rounds(mode: core.Mode) -> int:
    """More rounds than the throughput section: the difference sought is a few percent."""
    return 2 * mode.rounds + 1


def blocks(mode: core.Mode) -> int:
    return 2 * mode.blocks


def count(mode: core.Mode) -> int:
    return len(VARIANTS) * rounds(mode)


def overrides(variant: str, textfile: str) -> list[str]:
    if variant == "off":
        return [*BASE, "runtime.tensorboard=false"]
    return [*BASE, "runtime.tensorboard=true", f"runtime.metrics_textfile={textfile}"]


def wall_throughputs(run_dir: str) -> list[float]:
    """Samples per wall second between consecutive epoch rows of rank 0's metrics.jsonl, after
    the first epoch (as :func:`core.epoch_throughputs`): the epoch's training, its evaluation,
    and the previous epoch's end (metrics row, sinks, checkpoint check)."""
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [(b["samples_seen"] - a["samples_seen"]) / (b["elapsed_s"] - a["elapsed_s"])
            for a, b in zip(rows, rows[1:])]


def check_sinks(variant: str, run_dir: str, textfile: str) -> None:
    """The "on" jobs must have written both sinks' files and the "off" jobs neither: else
    the ratio compares nothing."""
    events = list((Path(run_dir) / "tensorboard").glob("events.out.tfevents.*"))
    prom = Path(textfile).is_file()
    if variant == "on" and not (events and prom):
        raise BenchError(f"monitoring 'on' wrote no {'TensorBoard events' if not events else 'metrics textfile'}: {run_dir}")
    if variant == "off" and (events or prom):
        raise BenchError(f"monitoring 'off' wrote sink files: {run_dir}")


def run(bench: Bench) -> dict:
    mode = bench.mode
    n_rounds, n_blocks = rounds(mode), blocks(mode)
    figures: dict[str, dict[str, list[list[float]]]] = {v: {f: [] for f in FIGURES} for v in VARIANTS}
    times: dict[str, list] = {v: [] for v in VARIANTS}
    for r in range(n_rounds):
        for variant in (VARIANTS if r % 2 == 0 else VARIANTS[::-1]):
            run_dir, textfile = bench.scratch(), str(Path(bench.scratch()) / "hvd_trainer.prom")
            args = ["trainer", "--steps", str(mode.steps), "--blocks", str(n_blocks), "--run-dir", run_dir]
            for o in overrides(variant, textfile):
                args += ["--override", o]
            out = bench.job("throughput", args, NP, desc=f"monitoring {variant} ({r + 1}/{n_rounds})")
            check_sinks(variant, run_dir, textfile)
            figures[variant]["train"].append(out["samples_per_s"])
            figures[variant]["wall"].append(wall_throughputs(run_dir))
            times[variant].append(breakdown.read_run(run_dir))
    return summarize(figures, times, steps=mode.steps, blocks=n_blocks)


def summarize(figures: dict[str, dict[str, list[list[float]]]], times: dict[str, list], **setup) -> dict[str, Any]:
    """``figures[variant][figure]``: one list of per-epoch samples/s per round. Each variant's
    figures over all epochs of all rounds; each round's on/off ratio of the jobs' medians."""
    out: dict[str, Any] = {"ranks": NP, "strategy": "horovod", "rounds": len(figures["off"]["wall"]),
                           "target": TARGET, **setup, "variants": {}, "ratios": {}}
    for v in VARIANTS:
        out["variants"][v] = {f: core.summary([x for job in figures[v][f] for x in job]) for f in FIGURES}
        out["variants"][v]["time"] = breakdown.median_over(times[v])
    for f in FIGURES:
        per_round = [statistics.median(on) / statistics.median(off)
                     for on, off in zip(figures["on"][f], figures["off"][f], strict=True)]
        out["ratios"][f] = core.summary(per_round)
    out["ratio"] = out["ratios"][FIGURES[0]]["median"]
    return out


def markdown(result: dict, plots) -> str:
    names = {"wall": "samples/s, wall (with epoch ends)", "train": "samples/s, training loop"}
    lines = [f"The default trainer (`strategy={result['strategy']}`, {result['ranks']} ranks, the throughput "
             f"section's model and batch), {result['rounds']} rounds alternating the variants, "
             f"{result['blocks']} timed epochs of {result['steps']} steps per job. `off`: "
             "`runtime.tensorboard=false`, no metrics sink; `on`: `runtime.tensorboard=true` and "
             "`runtime.metrics_textfile` (the Prometheus sink, no port). The step-time breakdown runs in both "
             "(it is always on). *wall*: samples per wall second from one epoch row to the next (the sinks' "
             "per-step and per-epoch work); *training loop*: the epoch's own throughput (their per-step work "
             "only). Per variant: median [min..max] over every timed epoch; ratio: on/off per round, "
             "median [min..max] over rounds.", "",
             "| figure | off | on | on / off |", "|---|---|---|---|"]
    for f in FIGURES:
        cells = []
        for v in VARIANTS:
            q = result["variants"][v][f]
            cells.append(f"{q['median']:.1f} [{q['min']:.1f}..{q['max']:.1f}]")
        r = result["ratios"][f]
        ratio = f"{r['median']:.3f} [{r['min']:.3f}..{r['max']:.3f}]"
        cells.append(f"**{ratio}**" if f == FIGURES[0] else ratio)
        lines.append(f"| {names[f]} | " + " | ".join(cells) + " |")
    t_off, t_on = (result["variants"][v].get("time") for v in VARIANTS)
    if t_off and t_on:
        lines.append("| step ms (breakdown) | " + " | ".join(f"{1e3 * t['step_s']:.2f}" for t in (t_off, t_on))
                     + f" | {t_on['step_s'] / t_off['step_s']:.3f} |")
        lines.append("| other ms per step (where the sinks' step() lands) | "
                     + " | ".join(f"{1e3 * t['other_s']:.3f}" for t in (t_off, t_on))
                     + f" | {1e3 * (t_on['other_s'] - t_off['other_s']):+.3f} ms |")
    met = result["ratio"] >= result["target"]
    lines += ["", f"- Monitoring on / off, wall samples/s at {result['ranks']} ranks: **{result['ratio']:.3f}** "
              f"(target >= {result['target']}: {'met' if met else '**not met**'})."]
    return "\n".join(lines)
