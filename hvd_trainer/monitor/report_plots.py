"""The figures of ``hvd-report``, one function per PNG: each takes the runs and a path, and
returns False (writing nothing) when no run has the data it draws. Several runs share the axes,
one colour per run, except the time breakdown: one panel per run, on a shared y axis.

Figures are built with matplotlib's object API, not pyplot: no global figure state to close and
no backend switch in the calling process; savefig renders the PNG with Agg.
"""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from .report_data import STEP_PARTS, Run, number

PART_COLOURS = {"data": "#8da0cb", "compute": "#66c2a5", "exchange": "#fc8d62",
                "optimizer": "#e78ac3", "other": "#b3b3b3"}
RANK_MARKERS = "os^vDP*X"


def _save(fig: Figure, path: Path) -> bool:
    fig.savefig(path, dpi=110)
    return True


def _series(rows: Sequence[dict[str, Any]], x: str, y: str, scale: float = 1.0) -> tuple[list, list]:
    """The (x, y) points of the rows that have both as numbers."""
    points = [(number(r.get(x)), number(r.get(y))) for r in rows]
    points = [(a, scale * b) for a, b in points if a is not None and b is not None]
    return [a for a, _ in points], [b for _, b in points]


def _legend(ax) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)


def loss_accuracy(runs: Sequence[Run], path: Path) -> bool:
    """Train and test loss (top) and test accuracy (bottom), against steps and against wall time."""
    fig = Figure(figsize=(11, 7), layout="constrained")
    axes = fig.subplots(2, 2)
    drawn = False
    for col, (x, label) in enumerate((("step", "step"), ("elapsed_s", "seconds since training start"))):
        loss, acc = axes[0][col], axes[1][col]
        for i, run in enumerate(runs):
            for key, style in (("train_loss", "-"), ("test_loss", "--")):
                xs, ys = _series(run.rows, x, key)
                loss.plot(xs, ys, style, color=f"C{i}", marker=".", label=f"{run.name} {key.split('_')[0]}")
                drawn |= bool(xs)
            xs, ys = _series(run.rows, x, "test_accuracy", 100.0)
            acc.plot(xs, ys, "-", color=f"C{i}", marker=".", label=run.name)
            drawn |= bool(xs)
        loss.set_ylabel("loss")
        acc.set_ylabel("test accuracy, %")
        acc.set_xlabel(label)
        loss.set_title("against steps" if col == 0 else "against wall time")
        _legend(loss)
        _legend(acc)
    return drawn and _save(fig, path)


def throughput(runs: Sequence[Run], path: Path) -> bool:
    """Samples per second at each epoch's end (over the run so far, and over that epoch alone);
    the epochs with a straggler warning are marked and labelled with its ranks."""
    fig = Figure(figsize=(8, 4.5), layout="constrained")
    ax = fig.subplots()
    drawn = marked = False
    top = 0.0
    for i, run in enumerate(runs):
        for key, style, what in (("samples_per_sec", "-", "run so far"), ("epoch_samples_per_sec", "--", "epoch")):
            xs, ys = _series(run.rows, "epoch", key)
            ax.plot(xs, ys, style, color=f"C{i}", marker="o", markersize=4, label=f"{run.name} ({what})")
            drawn, top = drawn or bool(xs), max([top, *ys])
        for row in run.rows:
            y = number(row.get("epoch_samples_per_sec")) or number(row.get("samples_per_sec"))
            if row.get("stragglers") and y is not None and number(row.get("epoch")) is not None:
                who = ", ".join(f"r{s.get('rank', '?')} {s.get('part', '?')}" for s in row["stragglers"])
                ax.plot([row["epoch"]], [y], "x", color="red", markersize=10, mew=2,
                        label=None if marked else "straggler warning")
                ax.annotate(who, (row["epoch"], y), textcoords="offset points", xytext=(4, 6),
                            fontsize=7, color="red")
                marked = True
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("samples per second (all ranks)")
    ax.set_title("throughput")
    ax.set_ylim(0, 1.15 * top or 1.0)  # room above the lines for the straggler labels
    _legend(ax)
    return drawn and _save(fig, path)


def time_breakdown(runs: Sequence[Run], path: Path) -> bool:
    """Per rank, the mean time of a step stacked by part; one panel per run, one y axis. A
    rank with a straggler warning is labelled with the parts it was slow in."""
    if not any(run.ranks() for run in runs):
        return False
    fig = Figure(figsize=(1.5 + 3.5 * len(runs), 4.5), layout="constrained")
    axes = fig.subplots(1, len(runs), sharey=True, squeeze=False)[0]
    top = 0.0
    for ax, run in zip(axes, runs):
        ax.set_title(run.name, fontsize=9)
        ranks = run.ranks()
        if not ranks:
            ax.text(0.5, 0.5, "no per-rank times\n(older run)", transform=ax.transAxes, ha="center")
            ax.set_xticks([])
            continue
        xs, bottom = list(range(len(ranks))), [0.0] * len(ranks)
        for part in STEP_PARTS:
            ms = [1000.0 * (number(r.get(f"{part}_s")) or 0.0) for r in ranks]
            ax.bar(xs, ms, bottom=bottom, color=PART_COLOURS[part], label=part, width=0.6)
            bottom = [b + m for b, m in zip(bottom, ms)]
        ax.set_xticks(xs, [f"{r.get('rank', k)}\n{r.get('host', '')}" for k, r in enumerate(ranks)], fontsize=7)
        ax.set_xlabel("rank")
        slow: dict[Any, set] = defaultdict(set)
        for s in run.stragglers():
            slow[s.get("rank")].add(str(s.get("part", "?")))
        for x, r in zip(xs, ranks):
            if r.get("rank", x) in slow:
                ax.annotate("straggler:\n" + ", ".join(sorted(slow[r.get("rank", x)])), (x, bottom[x]),
                            textcoords="offset points", xytext=(0, 3), ha="center", fontsize=7, color="red")
        top = max(top, *bottom)
    axes[0].set_ylabel("ms per step (mean over the run)")
    axes[0].set_ylim(0, 1.25 * top or 1.0)  # room above the bars for the straggler labels
    handles = next((ax.get_legend_handles_labels() for ax in axes if ax.get_legend_handles_labels()[0]))
    fig.legend(*handles, loc="outside right upper", fontsize=7)
    return _save(fig, path)


def memory(runs: Sequence[Run], path: Path) -> bool:
    """Each rank's resident memory at each epoch's end (left) and its peak so far (right);
    a colour per run, a marker per rank."""
    fig = Figure(figsize=(11, 4.5), layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    drawn = False
    for ax, key, title in zip(axes, ("rss_mb", "peak_rss_mb"), ("resident memory", "peak resident memory")):
        for i, run in enumerate(runs):
            per_rank: dict[Any, tuple[list, list]] = defaultdict(lambda: ([], []))
            for row in run.rows:
                for k, r in enumerate(row.get("ranks") or []):
                    epoch, mb = number(row.get("epoch")), number(r.get(key))
                    if epoch is not None and mb is not None:
                        per_rank[r.get("rank", k)][0].append(epoch)
                        per_rank[r.get("rank", k)][1].append(mb)
            for j, (rank, (xs, ys)) in enumerate(per_rank.items()):  # in rank order, as the rows list them
                ax.plot(xs, ys, "-", color=f"C{i}", marker=RANK_MARKERS[j % len(RANK_MARKERS)],
                        markersize=5, label=f"{run.name} rank {rank}")
                drawn = True
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0].set_ylabel("MiB")
    _legend(axes[1])
    return drawn and _save(fig, path)


# name of the PNG, the function that draws it, and its caption on the page
FIGURES = (
    ("loss_accuracy.png", loss_accuracy, "Loss and test accuracy against steps and against wall time"),
    ("throughput.png", throughput, "Throughput per epoch (straggler warnings marked)"),
    ("time_breakdown.png", time_breakdown, "Where a step's time goes, per rank (mean over the run)"),
    ("memory.png", memory, "Resident memory per rank over epochs"),
)
