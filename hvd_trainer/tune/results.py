"""What a study leaves in its folder, rewritten after every run of it:

    trials.csv, trials.md   one row per trial: parameters, metric, epochs, state, wall time, why
    best.yaml               the best trial's whole config, for ``hvd-train best.yaml``
    plots/*.png             optimisation history, learning curves, parameter importance, slices
    report/                 ``hvd-report`` over the trials' run dirs (their curves side by side)
"""
from __future__ import annotations

import csv
import warnings
from pathlib import Path
from typing import Any, Callable

import yaml

from .space import trial_tree
from .study import StudyConfig

COLUMNS = ["trial", "state", "metric", "epochs", "steps", "wall_s", "params", "why"]


def rows(study, cfg: StudyConfig) -> list[dict[str, Any]]:
    out = []
    for t in study.get_trials(deepcopy=False):
        out.append({"trial": t.number, "state": t.state.name.lower(),
                    "metric": None if t.value is None else round(float(t.value), 6),
                    "epochs": t.user_attrs.get("epochs", len(t.intermediate_values) or None),
                    "steps": t.user_attrs.get("steps"), "wall_s": t.user_attrs.get("wall_s"),
                    "params": " ".join(f"{k}={_short(v)}" for k, v in t.params.items()),
                    "why": t.user_attrs.get("why", "")})
    return out


def _short(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def table(rows_: list[dict[str, Any]], metric: str) -> str:
    head = [c if c != "metric" else metric for c in COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows_:
        lines.append("| " + " | ".join("" if r[c] is None else _short(r[c]) for c in COLUMNS) + " |")
    return "\n".join(lines)


def best_yaml(study, cfg: StudyConfig, folder: Path, base_dir: Path) -> Path | None:
    """The best complete trial's config, trained again under ``folder/best``."""
    try:
        best = study.best_trial
    except ValueError:  # no complete trial
        return None
    tree = trial_tree(cfg, base_dir, dict(best.params), folder / "best")
    ranks = len(best.user_attrs.get("ranks", [])) or cfg.ranks_per_trial
    head = (f"# study {cfg.name}: trial {best.number}, {cfg.metric} {best.value:.6g} on {ranks} rank(s)\n"
            f"#   mpirun -np {ranks} hvd-train {folder / 'best.yaml'}\n")
    path = folder / "best.yaml"
    path.write_text(head + yaml.safe_dump(tree, sort_keys=False), encoding="utf-8")
    return path


def plots(study, folder: Path) -> list[Path]:
    """Each of Optuna's figures that the trials so far can draw."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as vis

    figures: dict[str, Callable] = {"history": vis.plot_optimization_history,
                                    "curves": vis.plot_intermediate_values,
                                    "importance": vis.plot_param_importances,
                                    "slice": vis.plot_slice}
    out_dir, written = folder / "plots", []
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, draw in figures.items():
        path = out_dir / f"{name}.png"
        path.unlink(missing_ok=True)  # a figure from an earlier run would pass for this one
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Optuna marks these figures experimental
                ax = draw(study)
        except (ValueError, RuntimeError, ZeroDivisionError):  # too few trials for this figure
            plt.close("all")
            continue
        fig = (ax.flat[0] if hasattr(ax, "flat") else ax).figure
        fig.set_size_inches(8, 5)
        fig.savefig(path, dpi=90, bbox_inches="tight")
        plt.close("all")
        written.append(path)
    return written


def report(folder: Path, run_dirs: list[Path]) -> list[Path]:
    """``hvd-report`` over the trials that have metrics (a failed trial may have none)."""
    from ..monitor.report import write_report
    from ..monitor.report_data import RunDirError, load_runs

    runs = []
    for d in run_dirs:
        try:
            runs += load_runs([d])
        except RunDirError:
            continue
    return write_report(runs, folder / "report") if runs else []


def write_results(study, cfg: StudyConfig, folder: Path, base_dir: Path) -> dict[str, Any]:
    rs = rows(study, cfg)
    with open(folder / "trials.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rs)
    text = table(rs, cfg.metric)
    (folder / "trials.md").write_text(text + "\n", encoding="utf-8")
    best = best_yaml(study, cfg, folder, base_dir)
    figs = plots(study, folder)
    pages = report(folder, sorted(folder.glob("trial-*")))
    print(text, flush=True)
    print(f"hvd-tune: best: {best or 'none (no complete trial)'}; plots: {len(figs)} in {folder / 'plots'}; "
          f"report: {folder / 'report' if pages else 'none'}", flush=True)
    return {"rows": rs, "best": best, "plots": figs, "report": pages}
