"""``hvd-report RUN_DIR [RUN_DIR ...] [--out DIR]`` — plots and a one-file HTML page from run dirs.

    hvd-report runs/digits                        # writes runs/digits/report/*.png, report.html
    hvd-report runs/hvd runs/ddp --out compare/   # two runs side by side on the same axes

Reads each run dir's metrics.jsonl and summary.json; a run still going, or an older run without
per-rank times, gives the figures it has data for. A missing run dir, or one without
metrics.jsonl, prints one line naming it and exits 2. Runs offline: no MPI, no torch.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from .report_data import Run, RunDirError, load_runs
from .report_html import page
from .report_plots import FIGURES


def write_report(runs: Sequence[Run], out: Path) -> list[Path]:
    """Write each figure that has data, then report.html; return the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    written, shown, missing = [], [], []
    for filename, draw, caption in FIGURES:
        path = out / filename
        if draw(runs, path):
            written.append(path)
            shown.append((caption, path))
        else:
            missing.append(caption)
            # an earlier report's figure in the same folder would pass for these runs'
            path.unlink(missing_ok=True)
    html_path = out / "report.html"
    html_path.write_text(page(runs, shown, missing), encoding="utf-8")
    return written + [html_path]


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="hvd-report", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR",
                        help="a run's folder (metrics.jsonl, summary.json); several are compared")
    parser.add_argument("--out", type=Path, help="folder for the PNGs and report.html "
                        "(default: the first RUN_DIR's report/)")
    args = parser.parse_args(argv)
    try:
        runs = load_runs(args.run_dirs)
    except RunDirError as err:
        print(f"hvd-report: {err}", file=sys.stderr, flush=True)
        return 2
    out = args.out if args.out is not None else args.run_dirs[0] / "report"
    try:
        written = write_report(runs, out)
    except OSError as err:
        print(f"hvd-report: cannot write the report to {out}: {err}", file=sys.stderr, flush=True)
        return 1
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
