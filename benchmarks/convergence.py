"""Convergence: test accuracy against epochs and against wall time on the digits set.

Every variant is a real ``hvd-train digits`` run through the library API (the embedded config:
MLP [128, 64], SGD with momentum, lr 0.05 per worker scaled linearly, cosine schedule, seed 0),
``epochs = mode.epochs``, one thread per rank, no checkpoints. Rank 0 reports the per-epoch rows
of ``metrics.jsonl`` (``elapsed_s``: seconds since the trainer started, so launch and imports
are not counted).

The same seed and the same global batch per step everywhere: every synchronous step averages
2 x 16 samples' gradients at lr 0.1; async and SSP apply each worker's 16-sample gradient as a
step of its own at lr 0.05 (the trainer's rule).

  allreduce                 strategy=horovod, 2 workers                          (np 2)
  ps-sync                   strategy=ps, 2 workers + 1 server                    (np 3)
  ps-async                  ps.mode=async                                        (np 3)
  ps-ssp                    ps.mode=ssp, staleness 2                             (np 3)
  ps-sync+straggler         ps-sync, worker 1 sleeps STRAGGLER_MS every step     (np 3)
                            (in its loss function, before backward: each of its gradients is late)
  ps-sync+backup+straggler  3 workers + 1 server, backup_workers=1, same straggler (np 4):
                            each step averages the first 2 of 3 gradients (Chen et al. 2016,
                            "Revisiting distributed synchronous SGD": N + b workers against N).
                            lr pinned to 0.1 (lr_scaling=none): the trainer would scale by 3.
                            While the fast workers wait in the end-of-epoch evaluation, the
                            straggler's remaining steps are applied alone (the rule's design).

On this 2-core machine np 3 and np 4 are oversubscribed (``--bind-to none``, MPI yields when
idle), so the PS variants' wall time also pays for sharing cores; epochs are the fair axis for
them, wall time the honest one.

Launched by ``hvd-bench`` as ``mpirun -np N python -m benchmarks.convergence --job --epochs E
--run-dir DIR --override KEY=VALUE ...``. ``bench.straggler_ms=MS`` is this job's own override,
not a trainer setting: rank ``STRAGGLER_RANK`` trains through a ``loss_fn`` that sleeps MS ms.
"""
from __future__ import annotations

import argparse
import json
import shlex
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from . import core
from .core import Bench

TITLE = "Convergence: accuracy against epochs and wall time (digits)"
TARGET = 0.95
BASE_LR = 0.05          # digits.yaml's lr per worker
STRAGGLER_RANK, STRAGGLER_MS = 1, 20.0
PS_COUNTERS = ("pushes", "dropped_gradients", "max_staleness")  # from the run's summary
STRAGGLER = [f"bench.straggler_ms={STRAGGLER_MS}"]  # read by job(), not passed to the trainer

# name -> (ranks, overrides)
VARIANTS: dict[str, tuple[int, list[str]]] = {
    "allreduce": (2, ["strategy=horovod"]),
    "ps-sync": (3, ["strategy=ps", "ps.mode=sync"]),
    "ps-async": (3, ["strategy=ps", "ps.mode=async"]),
    "ps-ssp": (3, ["strategy=ps", "ps.mode=ssp", "ps.staleness=2"]),
    "ps-sync+straggler": (3, ["strategy=ps", "ps.mode=sync", *STRAGGLER]),
    "ps-sync+backup+straggler": (4, ["strategy=ps", "ps.mode=sync", "ps.backup_workers=1", *STRAGGLER,
                                     "optim.lr_scaling=none", f"optim.lr={2 * BASE_LR}"]),
}


def repeats(mode: core.Mode) -> int:
    """Runs per variant (async, SSP and backup workers depend on timing, so one run is one
    sample): quick mode two (the section must stay near 3 minutes here), full mode five."""
    return 2 if mode.name == "quick" else 5


def count(mode: core.Mode) -> int:
    return len(VARIANTS) * repeats(mode)


def workers(name: str) -> int:
    np, overrides = VARIANTS[name]
    return np - (1 if "strategy=ps" in overrides else 0)


def to_target(rows: Sequence[dict], target: float = TARGET) -> tuple[Optional[int], Optional[float]]:
    """(epoch, elapsed_s) of the first epoch end whose test accuracy reaches ``target``;
    (None, None) if none does. Measured at epoch ends only: no interpolation between them."""
    for r in rows:
        if r["test_accuracy"] >= target:
            return int(r["epoch"]), float(r["elapsed_s"])
    return None, None


def _maybe_summary(values: Sequence[Optional[float]]) -> Optional[dict[str, Any]]:
    got = [v for v in values if v is not None]
    return core.summary(got) if got else None


def _recorder(log: list[list[str]]) -> Callable[[int, list[str], dict[str, str]], list[str]]:
    """Bench.job's own mpirun line (one core per rank unless oversubscribed), kept for the report."""
    from hvd_trainer.runtime.launch_env import usable_cores
    from mpi_jobs import mpirun_command

    def build(np: int, program: list[str], env: dict[str, str]) -> list[str]:
        cmd = mpirun_command(np, program, env=env, bind_to="core" if np <= usable_cores() else "none")
        log.append(cmd)
        return cmd
    return build


def run(bench: Bench) -> dict:
    mode, n = bench.mode, repeats(bench.mode)
    result: dict[str, Any] = {"target": TARGET, "epochs": mode.epochs, "repeats": n, "variants": {}}
    runs: dict[str, list[dict]] = {name: [] for name in VARIANTS}
    commands: dict[str, list[list[str]]] = {name: [] for name in VARIANTS}
    for r in range(n):  # rounds alternate the variants, so slow drift hits them all alike
        for name, (np, overrides) in VARIANTS.items():
            with tempfile.TemporaryDirectory(prefix="hvd-bench-conv-") as run_dir:  # one for all ranks
                args = ["--epochs", str(mode.epochs), "--run-dir", run_dir]
                for o in overrides:
                    args += ["--override", o]
                t0 = time.monotonic()
                out = bench.job("convergence", args, np, command=_recorder(commands[name]),
                                desc=f"convergence {name} ({r + 1}/{n})")
            runs[name].append({"rows": out["rows"], "ps": out.get("ps", {}), "job_s": time.monotonic() - t0})
    for name, rs in runs.items():
        hits = [to_target(x["rows"]) for x in rs]
        result["variants"][name] = {
            "ranks": VARIANTS[name][0], "workers": workers(name), "overrides": VARIANTS[name][1],
            "commands": [shlex.join(c) for c in commands[name][:1]],  # repeats differ in --run-dir only
            "runs": rs,
            "final_accuracy": core.summary([x["rows"][-1]["test_accuracy"] for x in rs]),
            "final_train_loss": core.summary([x["rows"][-1]["train_loss"] for x in rs]),
            "train_s": core.summary([x["rows"][-1]["elapsed_s"] for x in rs]),
            "job_s": core.summary([x["job_s"] for x in rs]),
            "epochs_to_target": _maybe_summary([e for e, _ in hits]),
            "seconds_to_target": _maybe_summary([s for _, s in hits]),
            "reached": sum(e is not None for e, _ in hits),
        }
        for key in PS_COUNTERS:
            if all(key in x["ps"] for x in rs):
                result["variants"][name][key] = core.summary([x["ps"][key] for x in rs])
    return result


def _fmt(s: Optional[dict], spec: str, runs: int) -> str:
    if s is None:
        return "not reached"
    text = format(s["median"], spec)
    if s["n"] > 1:
        text += f" [{format(s['min'], spec)}..{format(s['max'], spec)}]"
    return text + (f" ({s['n']}/{runs} runs)" if s["n"] < runs else "")


def coinciding(result: dict) -> list[list[str]]:
    """Groups of variants whose first runs have the same accuracy at every epoch: the
    synchronous exchanges should compute the same steps (the plots draw them on top of each other)."""
    groups: dict[tuple, list[str]] = {}
    for name, v in result["variants"].items():
        groups.setdefault(tuple(r["test_accuracy"] for r in v["runs"][0]["rows"]), []).append(name)
    return [g for g in groups.values() if len(g) > 1]


def _plot(result: dict, x: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    styles = ["-", "--", "-.", ":"]  # sync variants can coincide epoch by epoch: keep both visible
    for i, (name, v) in enumerate(result["variants"].items()):
        rows = v["runs"][0]["rows"]
        ax.plot([r[x] for r in rows], [100 * r["test_accuracy"] for r in rows], marker="os^vDx"[i % 6],
                markersize=4, linestyle=styles[i % 4], label=f"{name} (np {v['ranks']})")
    ax.axhline(100 * result["target"], color="gray", linestyle="--", linewidth=1)
    ax.set_xlabel({"epoch": "epoch", "elapsed_s": "seconds since training start"}[x])
    ax.set_ylabel("test accuracy, %")
    ax.set_ylim(bottom=max(0.0, ax.get_ylim()[0]))
    ax.set_title(f"digits: test accuracy against {'epochs' if x == 'epoch' else 'wall time'} (first run)")
    ax.legend(fontsize=8)
    core.save_plot(fig, path)


def markdown(result: dict, plots: Path) -> str:
    n, target = result["repeats"], 100 * result["target"]
    lines = [f"hvd-train's embedded `digits` config, {result['epochs']} epochs, seed 0, one thread per rank; "
             "every synchronous step averages 2 x 16 samples at lr 0.1, async/SSP steps are one worker's 16 "
             f"samples at lr 0.05. Straggler: worker {STRAGGLER_RANK} sleeps {STRAGGLER_MS:g} ms in every training "
             "step, before backward (the benchmark's `loss_fn`; `bench.straggler_ms` in the commands). "
             "The backup variant runs 3 workers and averages the first 2 gradients per step (N + b against N). "
             "Ranks above 2 share the 2 cores (oversubscribed), servers included. "
             f"{n} run(s) per variant: median [min..max]. Times are seconds since training start, measured "
             "at epoch ends; `job` adds launch and imports.", "",
             f"| variant | ranks (workers) | final acc, % | final train loss | epochs to {target:g}% "
             f"| seconds to {target:g}% | train wall, s | job wall, s | dropped grads | max staleness |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, v in result["variants"].items():
        acc = dict(v["final_accuracy"], **{k: 100 * v["final_accuracy"][k] for k in ("median", "min", "max")})  # %
        ps = [_fmt(v[k], ".0f", n) if k in v else "" for k in ("dropped_gradients", "max_staleness")]
        lines.append(f"| {name} | {v['ranks']} ({v['workers']}) | {_fmt(acc, '.2f', n)} | "
                     f"{_fmt(v['final_train_loss'], '.4f', n)} | {_fmt(v['epochs_to_target'], '.0f', n)} | "
                     f"{_fmt(v['seconds_to_target'], '.1f', n)} | {_fmt(v['train_s'], '.1f', n)} | "
                     f"{_fmt(v['job_s'], '.1f', n)} | {ps[0]} | {ps[1]} |")
    for group in coinciding(result):
        lines += ["", f"- Same test accuracy at every epoch (first runs): {', '.join(group)}."]
    _plot(result, "epoch", plots / "convergence_epochs.png")
    _plot(result, "elapsed_s", plots / "convergence_wall.png")
    lines += ["", "![accuracy against epochs](plots/convergence_epochs.png)",
              "![accuracy against wall time](plots/convergence_wall.png)", "", "Commands:", "", "```"]
    lines += [c for v in result["variants"].values() for c in v["commands"]]
    lines.append("```")
    return "\n".join(lines)


# --- the job (every rank) ----------------------------------------------------------------------------
def straggler_loss(delay_ms: float) -> Callable:
    """Cross-entropy that first sleeps ``delay_ms``: a worker late with every gradient. Only
    under autograd: the trainer's evaluation (no_grad) calls ``loss_fn`` too and is not slowed."""
    import torch

    def loss_fn(logits, y):
        if torch.is_grad_enabled():
            time.sleep(delay_ms / 1000.0)
        return torch.nn.functional.cross_entropy(logits, y)
    return loss_fn


def job(epochs: int, run_dir: str, overrides: list[str]) -> Optional[dict]:
    """One ``hvd-train digits`` run; rank 0 returns its per-epoch rows, the others None.
    ``run_dir`` comes from the launching process: the trainer checks that every rank's config
    agrees, so each rank cannot make a temporary directory of its own."""
    from hvd_trainer import load_config, train
    from hvd_trainer.runtime.launch_env import launcher_rank

    delay_ms = sum(float(o.split("=", 1)[1]) for o in overrides if o.startswith("bench.straggler_ms="))
    overrides = [o for o in overrides if not o.startswith("bench.")]
    cfg = load_config("digits", [
        f"epochs={epochs}", "checkpoint.every_epochs=0", "checkpoint.resume=never",
        "runtime.progress=false", "runtime.threads=1", f"run_dir={run_dir}", *overrides])
    slow = delay_ms and launcher_rank() == STRAGGLER_RANK
    summary = train(cfg, loss_fn=straggler_loss(delay_ms) if slow else None)
    if launcher_rank() != 0:
        return None
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    keep = ("epoch", "step", "elapsed_s", "test_accuracy", "train_loss")
    return {"rows": [{k: r.get(k) for k in keep} for r in rows if "test_accuracy" in r],
            "ps": {k: summary[k] for k in PS_COUNTERS if k in summary}}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--job", action="store_true", required=True)
    p.add_argument("--epochs", type=int, required=True)
    p.add_argument("--run-dir", required=True)
    p.add_argument("--override", action="append", default=[])
    a = p.parse_args()
    out = job(a.epochs, a.run_dir, a.override)
    if out is not None:
        core.emit(out)


if __name__ == "__main__":
    main()
