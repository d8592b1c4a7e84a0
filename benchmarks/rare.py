"""Exchange rarely: time to a target accuracy for synchronous allreduce, local SGD, DiLoCo and
PowerSGD, on the hosts testbed with capped and uncapped links.

Two testbed hosts, one rank each (``mpi_jobs.testbed``; each host's link capped with ``tc tbf``
at every cap of :data:`CAPS`). Every variant is the real trainer (``train()``) on the digits set
(1,437 training and 360 held-out images, the trainer's own split) with a wide MLP
64-512-512-10 (0.30M parameters, a 1.2 MB gradient): its compute is ~1 ms a step and its
gradient takes ~0.1 s through a 100 Mbit link, so at that cap the exchange is the step and the
comparison is about communication. SGD with momentum 0.9, lr 0.05 per worker scaled linearly,
batch 16 per worker, seed 0, the same for every variant (local SGD's inner steps included).

An *epoch* here is :data:`EPOCH_STEPS` steps per worker (2,048 samples: ~1.4 passes over the
training set), so the trainer evaluates every 64 steps, and every H (4, 16, 64) divides the
epoch: the epoch-end averaging local SGD always does falls on its own schedule.

  allreduce      strategy=horovod: the gradient averaged every step
  local H=4..64  strategy=local_sgd local.sync_every=H: parameters averaged every H steps
  diloco H=64    local_sgd with local.outer=nesterov, outer lr 0.7, momentum 0.9 (the DiLoCo paper's)
  powersgd r=2   strategy=ddp ddp.comm_hook=powersgd ddp.powersgd_rank=2 (torch's hook); run only
                 where the config accepts those keys (:func:`powersgd_available`)

Per variant and cap: the wall time to :data:`TARGET` held-out accuracy (``elapsed_s`` of the first
epoch row at or above it: seconds since the trainer started, so launch and imports are not
counted), the bytes this rank had sent by then (the row's ``bytes_sent``), the final accuracy,
and the ratio of its time to allreduce's at the same cap. Rounds alternate the variants.

    hvd-bench --quick --only rare     # as root (network namespaces); ~5 min here
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from . import core
from .core import Bench

TITLE = "Exchange rarely: local SGD, DiLoCo, PowerSGD against allreduce (time to target, capped links)"
TARGET = 0.95
WORKERS = 2
HIDDEN = [512, 512]
INPUTS, CLASSES = 64, 10
BATCH = 16             # per worker
EPOCH_STEPS = 64       # per worker; every H below divides it
CAPS: tuple[Optional[float], ...] = (100.0, None)
BASELINE = "allreduce"
LOCAL_H = (4, 16, 64)
DILOCO_H, OUTER_LR, OUTER_MOMENTUM = 64, 0.7, 0.9  # DiLoCo's outer settings; it is meant for large H
POWERSGD_RANK = 2
POWERSGD = f"powersgd r={POWERSGD_RANK}"
POWERSGD_OVERRIDES = ["strategy=ddp", "ddp.comm_hook=powersgd", f"ddp.powersgd_rank={POWERSGD_RANK}"]
KEEP = ("epoch", "step", "elapsed_s", "test_accuracy", "train_loss", "bytes_sent")


def params() -> int:
    widths = [INPUTS, *HIDDEN, CLASSES]
    return sum(a * b + b for a, b in zip(widths, widths[1:]))


def variants() -> dict[str, list[str]]:
    """name -> trainer overrides, the baseline first."""
    out = {BASELINE: ["strategy=horovod"]}
    out.update({f"local H={h}": ["strategy=local_sgd", f"local.sync_every={h}"] for h in LOCAL_H})
    out[f"diloco H={DILOCO_H}"] = ["strategy=local_sgd", f"local.sync_every={DILOCO_H}", "local.outer=nesterov",
                                   f"local.outer_lr={OUTER_LR}", f"local.outer_momentum={OUTER_MOMENTUM}"]
    out[POWERSGD] = list(POWERSGD_OVERRIDES)
    return out


def powersgd_available() -> Optional[str]:
    """None if this trainer's config takes the PowerSGD variant's keys, else why not."""
    from hvd_trainer import load_config
    from hvd_trainer.config import ConfigError

    try:
        load_config(None, POWERSGD_OVERRIDES)
    except (ConfigError, ValueError) as err:
        return f"the trainer does not take {' '.join(POWERSGD_OVERRIDES[1:])} yet ({str(err).splitlines()[0]})"
    return None


def repeats(mode: core.Mode) -> int:
    return 2 if mode.name == "quick" else 3


def epochs(mode: core.Mode) -> int:
    return 4 if mode.name == "quick" else 8


def count(mode: core.Mode) -> int:
    return len(CAPS) * len(variants()) * repeats(mode)


# --- the pure parts: time, bytes and ratios at the target ----------------------------------------------
def at_target(rows: Sequence[dict], target: float = TARGET) -> Optional[dict]:
    """The first epoch row whose held-out accuracy is at or above ``target`` (None if none is):
    its epoch, step, ``elapsed_s`` as ``seconds`` and ``bytes_sent`` as ``bytes`` (None when the
    strategy does not count its traffic). Measured at epoch ends: no interpolation."""
    for r in rows:
        if r["test_accuracy"] >= target:
            sent = r.get("bytes_sent")
            return {"epoch": int(r["epoch"]), "step": int(r["step"]), "seconds": float(r["elapsed_s"]),
                    "bytes": int(sent) if sent else None}
    return None


def summarise(runs: Sequence[dict], target: float = TARGET) -> dict[str, Any]:
    """One variant's runs at one cap (each ``{"rows": [...]}``): medians with spreads of the time
    and bytes to target over the runs that reached it, the final accuracy over all of them."""
    hits = [at_target(r["rows"], target) for r in runs]
    got = [h for h in hits if h is not None]
    out: dict[str, Any] = {"runs": len(runs), "reached": len(got),
                           "final_accuracy": core.summary([r["rows"][-1]["test_accuracy"] for r in runs]),
                           "seconds_to_target": core.summary([h["seconds"] for h in got]) if got else None,
                           "steps_to_target": core.summary([h["step"] for h in got]) if got else None,
                           "bytes_to_target": None}
    sent = [h["bytes"] for h in got if h["bytes"] is not None]
    if got and len(sent) == len(got):
        out["bytes_to_target"] = core.summary(sent)
    return out


def ratios(cap: dict[str, dict], baseline: str = BASELINE) -> dict[str, Optional[float]]:
    """Each variant's median time to target over the baseline's at the same cap (None where
    either did not reach it)."""
    base = (cap.get(baseline) or {}).get("seconds_to_target")
    out = {}
    for name, v in cap.items():
        mine = v.get("seconds_to_target")
        out[name] = mine["median"] / base["median"] if mine and base else None
    return out


def best_rare(ratio: dict[str, Optional[float]]) -> Optional[tuple[str, float]]:
    """The fastest local SGD or DiLoCo variant and its ratio to allreduce."""
    cands = [(r, n) for n, r in ratio.items() if r is not None and n.split()[0] in ("local", "diloco")]
    return (min(cands)[1], min(cands)[0]) if cands else None


def powersgd_step_bytes(shapes: Sequence[Sequence[int]], rank: int, workers: int, min_rate: float = 2.0) -> int:
    """What one rank sends per step under torch's PowerSGD hook, as a ring allreduce of what it
    exchanges: a 2-D ``m x n`` weight as its factors P (``m x r``) and Q (``n x r``) when that
    compresses at least ``min_rate`` (the hook's ``min_compression_rate``), every other tensor
    whole, fp32. An estimate for when the strategy does not count its own traffic; it leaves
    out the uncompressed steps before the hook's ``start_powerSGD_iter``."""
    if workers <= 1:
        return 0
    floats = 0
    for shape in shapes:
        if len(shape) == 2:
            m, n = shape
            compressed = (m + n) * rank
            floats += compressed if m * n >= min_rate * compressed else m * n
        else:
            floats += math.prod(shape)
    return int(2 * (workers - 1) / workers * 4 * floats)


def mlp_shapes() -> list[tuple[int, ...]]:
    widths = [INPUTS, *HIDDEN, CLASSES]
    return [s for a, b in zip(widths, widths[1:]) for s in ((b, a), (b,))]


def analyse(result: dict) -> dict:
    """Summaries, ratios and the issue's target from the runs of every cap."""
    target = result["target"]
    for cap in result["caps"]:
        cap["variants"] = {name: summarise(runs, target) for name, runs in cap["runs"].items()}
        if POWERSGD in cap["variants"] and cap["variants"][POWERSGD]["bytes_to_target"] is None:
            v = cap["variants"][POWERSGD]
            if v["steps_to_target"]:
                per_step = powersgd_step_bytes(mlp_shapes(), POWERSGD_RANK, result["workers"])
                v["bytes_to_target_estimated"] = per_step * v["steps_to_target"]["median"]
        cap["ratio"] = ratios(cap["variants"])
        cap["best_rare"] = best_rare(cap["ratio"])
    capped = [c for c in result["caps"] if c["cap_mbit"] is not None and c["best_rare"]]
    result["best_rare_ratio_capped"] = min((c["best_rare"][1] for c in capped), default=None)
    return result


# --- the driver --------------------------------------------------------------------------------------
def cap_label(cap: Optional[float]) -> str:
    return "uncapped" if cap is None else f"{cap:g} Mbit"


def run(bench: Bench) -> dict:
    """Every cap on one testbed of ``WORKERS`` hosts (torn down on any exit)."""
    from mpi_jobs.testbed import Testbed, unavailable_reason

    from .links import testbed_launcher

    reason = unavailable_reason()
    if reason is not None:
        return {"skipped": f"hosts testbed unavailable: {reason}"}
    mode = bench.mode
    chosen = variants()
    missing = powersgd_available()
    if missing:
        del chosen[POWERSGD]
    result: dict[str, Any] = {
        "target": TARGET, "model": f"MLP {INPUTS}-{'-'.join(map(str, HIDDEN))}-{CLASSES}", "params": params(),
        "bytes": 4 * params(), "workers": WORKERS, "batch_per_worker": BATCH, "epoch_steps": EPOCH_STEPS,
        "epochs": epochs(mode), "repeats": repeats(mode), "overrides": chosen, "not_run": {}, "caps": [],
        "commands": {}}
    if missing:
        result["not_run"][POWERSGD] = missing
    with Testbed(hosts_count=WORKERS) as tb:
        def launcher(name: str) -> Callable:
            return testbed_launcher(tb, result["commands"], name)

        for cap in CAPS:
            for h in tb.hosts:
                tb.limit_bandwidth(h, cap)
            label = cap_label(cap)
            point: dict[str, Any] = {"cap_mbit": cap, "label": label,
                                     "measured_mbit": tb.measure_mbit(tb.hosts[0], tb.hosts[1], nbytes=_probe_bytes(cap)),
                                     "runs": {name: [] for name in chosen}}
            for r in range(repeats(mode)):  # rounds alternate the variants: drift hits them all alike
                for name, overrides in chosen.items():
                    args = ["--epochs", str(epochs(mode)), "--run-dir", bench.scratch(),
                            *[a for o in overrides for a in ("--override", o)]]
                    out = bench.job("rare", args, WORKERS, command=launcher(name), timeout=900,
                                    desc=f"rare {label} {name} ({r + 1}/{repeats(mode)})")
                    point["runs"][name].append(out)
            result["caps"].append(point)
            bench.log(f"[rare] {label}: {point['measured_mbit']:.0f} Mbit/s measured; " + ", ".join(
                f"{n} {_first_hit(rs)}" for n, rs in point["runs"].items()))
    return analyse(result)


def _first_hit(runs: list[dict]) -> str:
    h = at_target(runs[0]["rows"])
    return "not reached" if h is None else f"{h['seconds']:.1f} s"


def _probe_bytes(cap: Optional[float]) -> int:
    return 64 << 20 if cap is None else max(4 << 20, int(cap * 1e6 / 8 * 0.4))


# --- the report --------------------------------------------------------------------------------------
_q = core.median_range


def _bytes(v: dict) -> str:
    if v["bytes_to_target"] is not None:
        return _q(v["bytes_to_target"], ".2f", 1e-6)
    if "bytes_to_target_estimated" in v:
        return f"~{v['bytes_to_target_estimated'] / 1e6:.2f} (estimated: not counted by ddp)"
    return "not counted" if v["seconds_to_target"] else "-"


def markdown(result: dict, plots: Path) -> str:
    if "skipped" in result:
        return f"Skipped: {result['skipped']}"
    t, n = 100 * result["target"], result["repeats"]
    lines = [
        f"{result['model']} ({result['params'] / 1e6:.2f}M parameters, {result['bytes'] / 1e6:.1f} MB of gradient) "
        f"on digits, batch {result['batch_per_worker']} per worker, {result['workers']} workers, one rank per "
        f"testbed host (links capped with `tc tbf`). SGD, momentum 0.9, lr 0.05 per worker scaled linearly "
        f"(every variant, local steps included), seed 0. Evaluation every {result['epoch_steps']} steps per worker "
        f"(one epoch here), {result['epochs']} epochs. DiLoCo: outer Nesterov, lr {OUTER_LR}, momentum "
        f"{OUTER_MOMENTUM}. {n} runs per variant and cap, rounds alternating the variants: median [min..max]. "
        f"Time: seconds since the trainer started to the first evaluation at or above {t:g}%. Bytes: this rank's "
        "ring-allreduce traffic (2(N-1)/N of what it reduces) at that evaluation, from the metrics row.", ""]
    for name, why in result.get("not_run", {}).items():
        lines += [f"- **{name} not run**: {why}.", ""]
    for cap in result["caps"]:
        lines += [f"**{cap['label']}** (measured {cap['measured_mbit']:.0f} Mbit/s)", "",
                  f"| variant | s to {t:g}% | / allreduce | steps to {t:g}% | MB sent to {t:g}% | final acc, % |",
                  "|---|---|---|---|---|---|"]
        for name, v in cap["variants"].items():
            r = cap["ratio"][name]
            lines.append(f"| {name} | {_q(v['seconds_to_target'], '.2f', runs=v['runs'])} | "
                         f"{'-' if r is None else f'{r:.3f}'} | {_q(v['steps_to_target'], '.0f')} | {_bytes(v)} | "
                         f"{_q(v['final_accuracy'], '.2f', 100)} |")
        if cap["best_rare"]:
            lines += ["", f"- Fastest of local SGD / DiLoCo: {cap['best_rare'][0]}, "
                          f"{cap['best_rare'][1]:.3f}x allreduce's time to {t:g}%."]
        lines.append("")
    best = result.get("best_rare_ratio_capped")
    if best is not None:
        lines += [f"- Target: at 100 Mbit the best of local SGD / DiLoCo reaches {t:g}% in <= 0.33x allreduce's "
                  f"time: **{best:.3f}x** ({'met' if best <= 0.33 else 'NOT met'}).", ""]
    _plot(result, plots / "rare_accuracy_wall.png")
    lines += ["![accuracy against wall time](plots/rare_accuracy_wall.png)", "", "Commands (first of each variant):",
              "", "```", *result.get("commands", {}).values(), "```"]
    return "\n".join(lines)


def _plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    caps = result["caps"]
    fig, axes = plt.subplots(1, len(caps), figsize=(5.5 * len(caps), 4), squeeze=False)
    for ax, cap in zip(axes[0], caps):
        for i, (name, runs) in enumerate(cap["runs"].items()):
            rows = runs[0]["rows"]
            ax.plot([r["elapsed_s"] for r in rows], [100 * r["test_accuracy"] for r in rows], marker="os^vDx"[i % 6],
                    markersize=4, label=name)
        ax.axhline(100 * result["target"], color="gray", linestyle="--", linewidth=1)
        ax.set_xscale("log")
        ax.set_xlabel("seconds since training start (log)")
        ax.set_ylabel("held-out accuracy, %")
        ax.set_title(f"{cap['label']} (first run of each)")
        ax.legend(fontsize=7)
    core.save_plot(fig, path)


# --- the job (every rank) ----------------------------------------------------------------------------
def cycled(n: int, length: int, seed: int) -> list[int]:
    """``length`` indices into ``range(n)``: seeded permutations one after another, so every
    sample appears as often as any other, up to one."""
    import torch

    g, out = torch.Generator().manual_seed(seed), []
    while len(out) < length:
        out += torch.randperm(n, generator=g).tolist()
    return out[:length]


def job(epochs: int, run_dir: str, overrides: list[str]) -> Optional[dict]:
    """One trainer run; rank 0 returns its epoch rows and summary counters, the others None.
    Every rank calls with the same arguments (the trainer checks that the configs agree)."""
    from torch.utils.data import Subset

    from hvd_trainer import load_config, train
    from hvd_trainer.data.sources import build_splits
    from hvd_trainer.runtime.launch_env import launcher_rank

    cfg = load_config(None, [
        "data.name=digits", "model.name=mlp", f"model.hidden={HIDDEN}", "optim.name=sgd", "optim.lr=0.05",
        "optim.momentum=0.9", "optim.lr_scaling=linear", f"batch_size={BATCH}", f"epochs={epochs}", "seed=0",
        "checkpoint.every_epochs=0", "checkpoint.resume=never", "runtime.progress=false", "runtime.threads=1",
        f"run_dir={run_dir}", *overrides])
    splits = build_splits(cfg.data, cfg.seed)
    train_data = Subset(splits.train, cycled(len(splits.train), EPOCH_STEPS * BATCH * WORKERS, cfg.seed))
    summary = train(cfg, train_data=train_data, test_data=splits.test)
    if launcher_rank() != 0:
        return None
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return {"rows": [{k: r.get(k) for k in KEEP} for r in rows if "test_accuracy" in r],
            "averagings": summary.get("averagings"), "bytes_sent_per_rank": summary.get("bytes_sent_per_rank")}


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--job", action="store_true", required=True)
    p.add_argument("--epochs", type=int, required=True)
    p.add_argument("--run-dir", required=True)
    p.add_argument("--override", action="append", default=[])
    a = p.parse_args(argv)
    out = job(a.epochs, a.run_dir, a.override)
    if out is not None:
        core.emit(out)


if __name__ == "__main__":
    main(sys.argv[1:])
