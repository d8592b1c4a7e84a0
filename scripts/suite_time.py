"""Time the test suites of two trees side by side, and the newer tree on the older one's tests.

    python scripts/suite_time.py OLD_DIR NEW_DIR [--also REGEX ...] [--rounds N] [--full]

OLD_DIR and NEW_DIR are checkouts with their own venv installed (``bash scripts/install.sh`` in
each). Each round runs, one after the other: OLD's whole suite, then NEW's tests that hold OLD's
invariants, then (``--full``) NEW's whole suite. "OLD's invariants" in NEW are the tests whose
node id is in both trees, every unit test of NEW (where invariants moved to leave the mpirun
tier), and the tests matching an ``--also`` pattern (those that replaced a removed or renamed
test). A later tree adds tests for new features, so its whole suite's time alone does not say
whether the same checks got faster. Prints pytest's own time for each run, then the median and
range over the rounds and the ratio to OLD's whole suite. Runs nothing in parallel: run it on an
otherwise idle machine.

With ``--prebuild``, each tree's container image is built (``containers/build.sh --if-changed``,
timed apart) before its suite runs, so the suite's own time leaves out a build whose length
depends on what the build cache holds (the two trees share the image's tag and evict each other).
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil


def run_pytest(tree: Path, args: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, CI="true", PATH=f"{tree / '.venv' / 'bin'}:{os.environ['PATH']}")
    cmd = [str(tree / ".venv" / "bin" / "python"), "-m", "pytest", "-p", "no:randomly", *args]
    return subprocess.run(cmd, cwd=tree, env=env, text=True, capture_output=True)


def collect(tree: Path) -> list[str]:
    res = run_pytest(tree, ["--collect-only", "-q"])
    ids = [line.strip() for line in res.stdout.splitlines() if "::" in line]
    if res.returncode != 0 or not ids:
        sys.exit(f"suite_time: collecting {tree} failed:\n{res.stdout[-2000:]}{res.stderr[-2000:]}")
    return ids


def timed(tree: Path, args: list[str], label: str) -> float:
    """pytest's own wall time for one run; any failure stops the comparison."""
    res = run_pytest(tree, ["-q", *args])
    last = res.stdout.strip().splitlines()[-1] if res.stdout.strip() else ""
    found = re.search(r"(\d+) passed.* in ([\d.]+)s", last)
    if res.returncode != 0 or not found or "failed" in last or "error" in last:
        sys.exit(f"suite_time: {label} did not pass: {last}\n{res.stdout[-3000:]}")
    print(f"{label:<24} {found.group(1):>4} passed in {float(found.group(2)):7.1f} s", flush=True)
    return float(found.group(2))


def prebuild(tree: Path, label: str) -> None:
    """The image the container tests use, built before the timed run (timed apart)."""
    script = tree / "containers" / "build.sh"
    if not script.exists():
        return
    t0 = time.monotonic()
    res = subprocess.run([str(script), "--tag", "hvd-trainer-test", "--if-changed"], cwd=tree, text=True,
                         capture_output=True, env=dict(os.environ, USER=os.environ.get("USER", "root")))
    if res.returncode != 0:
        sys.exit(f"suite_time: {script} failed:\n{res.stderr[-3000:]}")
    # ch-image may start a git garbage collection of its build cache that outlives the build and
    # takes every core: wait for it, or it would run inside the timed suite
    while any("bucache" in " ".join(p.info["cmdline"] or []) for p in psutil.process_iter(["cmdline"])):
        time.sleep(2)
    print(f"{label:<24} image built in {time.monotonic() - t0:7.1f} s (not counted)", flush=True)


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):7.1f} s [{min(values):.1f}..{max(values):.1f}]"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("old", type=Path)
    ap.add_argument("new", type=Path)
    ap.add_argument("--also", action="append", default=[], metavar="REGEX",
                    help="NEW's tests that replaced one of OLD's (matched against the node id)")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--full", action="store_true", help="also time NEW's whole suite")
    ap.add_argument("--prebuild", action="store_true", help="build each tree's test image before its run")
    args = ap.parse_args()
    old, new = args.old.resolve(), args.new.resolve()

    old_ids, new_ids = set(collect(old)), collect(new)
    same = [i for i in new_ids if i in old_ids or i.startswith("tests/unit/")
            or any(re.search(p, i) for p in args.also)]
    print(f"OLD {len(old_ids)} tests; NEW {len(new_ids)}, of which {len(same)} hold OLD's invariants "
          f"({sum(i in old_ids for i in new_ids)} same ids, {sum(i.startswith('tests/unit/') for i in same)} unit)")
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write("\n".join(same) + "\n")
    times: dict[str, list[float]] = {"old": [], "same": [], "full": []}
    runs = [("old", old, [], "OLD whole"), ("same", new, [f"@{f.name}"], "NEW on OLD's")]
    runs += [("full", new, [], "NEW whole")] if args.full else []
    for r in range(args.rounds):
        for key, tree, selection, label in runs:
            if args.prebuild:
                prebuild(tree, f"round {r + 1}: {label}")
            times[key].append(timed(tree, selection, f"round {r + 1}: {label}"))
    print(f"OLD whole suite:        {spread(times['old'])}")
    for key, label in (("same", "NEW on OLD's tests"), ("full", "NEW whole suite")):
        if times[key]:
            ratios = [t / o for t, o in zip(times[key], times["old"])]
            print(f"{label + ':':<23} {spread(times[key])}  ratio to OLD {statistics.median(ratios):.2f} "
                  f"[{min(ratios):.2f}..{max(ratios):.2f}]")
    os.unlink(f.name)


if __name__ == "__main__":
    main()
