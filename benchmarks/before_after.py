"""Throughput of two checkouts of the trainer, alternating in one run.

    .venv/bin/python benchmarks/before_after.py --before /tmp/base --rounds 4

Each checkout runs with its own installed environment (``CHECKOUT/.venv/bin/python``; make one
with ``CHECKOUT/scripts/install.sh``, which reuses the cached Horovod build). Each round runs
every job once per checkout, the order flipping every round so that drift on a noisy machine
falls on both alike. A job's figure is the median of its per-epoch samples/s after the first
epoch (evaluation and start-up excluded); a round's ratio is after/before. Reported: the median
ratio over rounds with its range, and each side's median.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from mpi_jobs import mpirun_command  # noqa: E402

COMMON = ["digits", "epochs=6", "checkpoint.every_epochs=0", "checkpoint.resume=never",
          "runtime.progress=false", "runtime.threads=1"]
JOBS = {  # name -> (ranks, overrides)
    "horovod (default), np 2": (2, ["strategy=horovod"]),
    "ps sync, np 3 (1 server)": (3, ["strategy=ps", "ps.mode=sync"]),
}


def run_job(checkout: Path, np: int, overrides: list[str], timeout: float = 600) -> float:
    python = checkout / ".venv" / "bin" / "python"
    with tempfile.TemporaryDirectory(prefix="hvd-ba-") as run_dir:
        program = [str(python), "-m", "hvd_trainer.cli", *COMMON, *overrides, f"run_dir={run_dir}"]
        res = subprocess.run(mpirun_command(np, program), cwd=checkout, capture_output=True, text=True,
                             timeout=timeout)
        if res.returncode != 0:
            raise RuntimeError(f"{checkout}: rc {res.returncode}\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}")
        rows = [json.loads(line) for line in Path(run_dir, "metrics.jsonl").read_text().splitlines()]
    rates = [r["epoch_samples_per_sec"] for r in rows[1:] if r.get("epoch_samples_per_sec")]
    return statistics.median(rates)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--before", type=Path, required=True, help="the other checkout (with its own .venv)")
    p.add_argument("--after", type=Path, default=REPO)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--out", type=Path, help="also write the table (markdown) here")
    a = p.parse_args()
    sides = {"before": a.before.resolve(), "after": a.after.resolve()}
    figures = {job: {"before": [], "after": []} for job in JOBS}
    for r in range(a.rounds):
        order = ["before", "after"] if r % 2 == 0 else ["after", "before"]
        for job, (np, overrides) in JOBS.items():
            for side in order:
                figures[job][side].append(run_job(sides[side], np, overrides))
            print(f"round {r + 1}/{a.rounds} {job}: before {figures[job]['before'][-1]:.0f}, "
                  f"after {figures[job]['after'][-1]:.0f} samples/s", flush=True)
    lines = [f"before: {sides['before']}  after: {sides['after']}  rounds: {a.rounds}", "",
             "| job | before (median samples/s) | after | after/before, median | range over rounds |",
             "|---|---|---|---|---|"]
    for job, f in figures.items():
        ratios = [x / y for x, y in zip(f["after"], f["before"], strict=True)]
        lines.append(f"| {job} | {statistics.median(f['before']):.0f} | {statistics.median(f['after']):.0f} | "
                     f"{statistics.median(ratios):.3f} | {min(ratios):.3f}-{max(ratios):.3f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out:
        a.out.write_text(text)


if __name__ == "__main__":
    main()
