"""Shared by the benchmark scripts: launching one measured job under mpirun and reporting.

A job prints one line ``BENCH_RESULT [samples/s, ...]`` (rank 0); the driver collects those
from alternating rounds and reports medians, spreads and ratios measured in the same run.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

MARK = "BENCH_RESULT "
TMP = Path(os.environ.get("TMPDIR", "/tmp")) / "hvd-bench"


def emit(values: Sequence[float]) -> None:
    """Called by a job's rank 0 with its measurements."""
    if values:
        print(MARK + json.dumps(list(values)), flush=True)


def timed_blocks(step, steps: int, blocks: int, samples_per_step: int) -> list[float]:
    """One warm-up block of ``steps`` calls to ``step()``, then ``blocks`` timed blocks;
    returns samples/s of each timed block."""
    for _ in range(steps):
        step()
    out = []
    for _ in range(blocks):
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        out.append(steps * samples_per_step / (time.perf_counter() - t0))
    return out


def epoch_throughputs(run_dir: str) -> list[float]:
    """Per-epoch samples/s a trainer run wrote to metrics.jsonl, without the warm-up epoch."""
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["epoch_samples_per_sec"] for line in lines[1:]]


def run_job(script: str, job_args: Sequence[str], np: int, env: Optional[dict] = None,
            bind_to: str = "", timeout: float = 900) -> list[float]:
    """Run ``script --job ...`` on ``np`` ranks; return rank 0's measurements."""
    from mpi_jobs import mpirun_command

    from hvd_trainer.launch_env import usable_cores

    cores = usable_cores()
    cmd = mpirun_command(np, [sys.executable, script, *job_args], env=env or {},
                         bind_to=bind_to or ("core" if np <= cores else "none"))
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("HOROVOD_")}
    full_env.update(env or {})
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env)
    for line in res.stdout.splitlines():
        if line.startswith(MARK):
            return json.loads(line[len(MARK):])
    raise RuntimeError(f"job failed ({res.returncode}): {' '.join(cmd)}\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}")


def run_rounds(variants: dict, rounds: int, run) -> dict[str, list[float]]:
    """``run(name, spec) -> list[float]`` for every variant, ``rounds`` times, alternating."""
    results: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(rounds):
        for name, spec in variants.items():
            results[name] += run(name, spec)
            print(f"round {r + 1}/{rounds} {name:<24} {statistics.median(results[name]):9.1f}",
                  file=sys.stderr, flush=True)
    return results


def report(title: str, results: dict[str, list[float]], ratios: dict[str, tuple[str, str]],
           targets: dict[str, float], json_path: Optional[str] = None, unit: str = "samples/s") -> dict:
    med = {n: statistics.median(v) for n, v in results.items()}
    print(f"\n{title}\n(median {unit}, min..max over {len(next(iter(results.values())))} timed blocks)")
    for name, vals in results.items():
        print(f"  {name:<26} {med[name]:9.1f}   ({min(vals):.1f} .. {max(vals):.1f})")
    out = {}
    print("ratios (same run)")
    for label, (a, b) in ratios.items():
        value = med[a] / med[b]
        out[label] = value
        t = targets.get(label)
        verdict = "" if t is None else f"   target >= {t:.2f}: {'met' if value >= t else 'NOT met'}"
        print(f"  {label:<40} {value:6.3f}{verdict}")
    if json_path:
        Path(json_path).write_text(json.dumps({"raw": results, "median": med, "ratios": out,
                                               "time": time.strftime("%Y-%m-%d %H:%M")}, indent=2))
    return out
