"""Trainer throughput of two checkouts, side by side in one run (alternating jobs, medians).

    .venv/bin/python benchmarks/before_after.py --before /tmp/old-clone --rounds 4          # Horovod CNN
    .venv/bin/python benchmarks/before_after.py --before /tmp/old-clone --rounds 4 --ps     # PS MLP, np=3

Each checkout's own ``benchmarks/throughput.py --job trainer`` (or ``ps_throughput.py``) runs
with the Python of this checkout, so both must have their packages importable from their own
folder (the job scripts put their checkout first on ``sys.path``). Use it to show that a change
does not move throughput: numbers from different runs on this noisy 2-core machine are not
comparable, alternating jobs in one run are.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from common import REPO, TMP, report, run_job, run_rounds

from hvd_trainer.launch_env import MPI_RUNTIME_DEFAULTS


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--before", required=True, help="the other checkout (e.g. a clone at an older commit)")
    p.add_argument("--after", default=str(REPO), help="default: this checkout")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--ps", action="store_true", help="the parameter server (np=3, sync) instead of Horovod (np=2)")
    args = p.parse_args()
    script = "ps_throughput.py" if args.ps else "throughput.py"
    job = ["--job", "trainer"] + (["--steps", "40", "--blocks", "3"] if args.ps else ["--steps", "20", "--blocks", "2"])
    env = {"OMP_NUM_THREADS": "1", **({} if args.ps else MPI_RUNTIME_DEFAULTS)}
    np = 3 if args.ps else 2
    variants = {"before": Path(args.before) / "benchmarks" / script, "after": Path(args.after) / "benchmarks" / script}

    def run(name, path):
        return run_job(str(path), job + ["--run-dir", str(TMP / f"ba-{time.monotonic_ns()}")], np, env)

    results = run_rounds(variants, args.rounds, run)
    report(f"before/after ({'PS MLP, np=3' if args.ps else 'Horovod CNN, np=2'}), {args.rounds} alternating rounds",
           results, {"after vs before": ("after", "before")}, {})


if __name__ == "__main__":
    main()
