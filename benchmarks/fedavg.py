"""FedAvg over non-IID clients: held-out accuracy against rounds, what non-IID data costs and
what FedProx recovers.

Two ranks on this host, each simulating its share of K = :data:`CLIENTS` virtual clients
(``strategy=fedavg``). Every variant is the real trainer (``train()``) on digits (the trainer's
own split: 1,438 training and 359 held-out images), MLP 64-128-64-10 (the ``digits`` config's),
a fraction C = :data:`FRACTION` of the clients sampled each round (10 of 20: 5 a rank, no padding),
batch :data:`BATCH`, SGD lr 0.05 with momentum 0.9 (a client's optimizer starts afresh every
round), constant lr, R rounds (:func:`rounds`). The held-out set is scored after every round.

  IID E=1, E=5                 fedavg.alpha unset: a seeded even split
  alpha=100, 1, 0.1 E=1, E=5   a Dirichlet(alpha) split over labels (0.1: most clients hold 1-2 classes)
  fedprox mu=M alpha=0.1 E=5   fedavg.mu=M for every M in :data:`MUS`

Each repeat is one seed (:func:`seeds`): the seed draws the initial model, the split and each
round's clients, so a seed's variants share the model and the sampled clients, and its
differences (IID minus non-IID, FedProx minus FedAvg) are paired. One ``mpirun -np 2`` job per
seed runs every variant one after another (the trainer re-initialises Horovod per run), so
launching is paid once a seed.

    hvd-bench --quick --only fedavg     # ~4 min here
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

from . import core
from .core import Bench

TITLE = "FedAvg: accuracy against rounds over non-IID clients, and what FedProx recovers (digits)"
TARGET = 0.90
WORKERS = 2
CLIENTS, FRACTION, BATCH = 20, 0.5, 16
HIDDEN = [128, 64]
INPUTS, CLASSES = 64, 10
ALPHAS: tuple[Optional[float], ...] = (None, 100.0, 1.0, 0.1)   # None: IID
LOCAL_EPOCHS = (1, 5)
PROX_ALPHA, PROX_E = 0.1, 5
MUS = (0.01, 0.1, 1.0)
TAIL = 5              # rounds averaged for the "last rounds" accuracy: non-IID curves swing round to round
BASE = ["data.name=digits", "model.name=mlp", f"model.hidden={HIDDEN}", "optim.name=sgd", "optim.lr=0.05",
        "optim.momentum=0.9", "optim.lr_scaling=none", "optim.warmup_epochs=0", "optim.schedule=constant",
        f"batch_size={BATCH}", "strategy=fedavg", f"fedavg.clients={CLIENTS}", f"fedavg.fraction={FRACTION}",
        "checkpoint.every_epochs=0", "checkpoint.resume=never", "runtime.progress=false", "runtime.threads=1"]


def rounds(mode: core.Mode) -> int:
    return 40 if mode.name == "quick" else 60


def seeds(mode: core.Mode) -> list[int]:
    return list(range(5 if mode.name == "quick" else 8))


def count(mode: core.Mode) -> int:
    return len(seeds(mode))  # one job per seed


def params() -> int:
    widths = [INPUTS, *HIDDEN, CLASSES]
    return sum(a * b + b for a, b in zip(widths, widths[1:]))


def label(alpha: Optional[float], local_epochs: int, mu: float = 0.0) -> str:
    data = "IID" if alpha is None else f"alpha={alpha:g}"
    return f"{'' if not mu else f'fedprox mu={mu:g} '}{data} E={local_epochs}"


def variants() -> dict[str, list[str]]:
    """name -> trainer overrides: every alpha at every E, then FedProx at each mu."""
    out = {}
    for e in LOCAL_EPOCHS:
        for a in ALPHAS:
            out[label(a, e)] = [f"fedavg.local_epochs={e}", *([] if a is None else [f"fedavg.alpha={a:g}"])]
    for mu in MUS:
        out[label(PROX_ALPHA, PROX_E, mu)] = [f"fedavg.local_epochs={PROX_E}", f"fedavg.alpha={PROX_ALPHA:g}",
                                              f"fedavg.mu={mu:g}"]
    return out


# --- the pure parts: rounds to target, the shortfall, the recovery ------------------------------------
# A run is {"seed", "accuracy": held-out accuracy after rounds 1..R, "bytes_sent": one rank's
# total, "train_s": seconds since the trainer started, at the last round}.
def rounds_to(accuracy: Sequence[float], target: float = TARGET) -> Optional[int]:
    """The first round (from 1) whose held-out accuracy is at or above ``target`` (None: never)."""
    return next((i for i, a in enumerate(accuracy, 1) if a >= target), None)


def tail_mean(accuracy: Sequence[float], k: int = TAIL) -> float:
    """Held-out accuracy averaged over the last ``k`` rounds."""
    last = accuracy[-k:]
    return sum(last) / len(last)


def final(accuracy: Sequence[float]) -> float:
    return accuracy[-1]


def bytes_per_round(run: dict) -> Optional[float]:
    """Bytes one rank sent per round (None: not counted)."""
    return run["bytes_sent"] / len(run["accuracy"]) if run.get("bytes_sent") else None


def _maybe(values: Sequence[Optional[float]]) -> Optional[dict]:
    got = [v for v in values if v is not None]
    return core.summary(got) if got else None


def summarise(runs: Sequence[dict], target: float = TARGET) -> dict[str, Any]:
    """One variant over its seeds: final and last-rounds accuracy, rounds to target (over the
    runs that reached it), bytes per rank and round, training seconds."""
    return {"runs": len(runs), "reached": sum(rounds_to(r["accuracy"], target) is not None for r in runs),
            "final_accuracy": core.summary([final(r["accuracy"]) for r in runs]),
            "tail_accuracy": core.summary([tail_mean(r["accuracy"]) for r in runs]),
            "rounds_to_target": _maybe([rounds_to(r["accuracy"], target) for r in runs]),
            "bytes_per_round": _maybe([bytes_per_round(r) for r in runs]),
            "train_s": core.summary([r["train_s"] for r in runs])}


def paired_gap(better: Sequence[dict], worse: Sequence[dict], measure) -> dict:
    """``measure(better) - measure(worse)`` seed by seed (the runs of both lists in seed order),
    in percentage points."""
    if [r["seed"] for r in better] != [r["seed"] for r in worse]:
        raise ValueError("the runs are not paired by seed")
    return core.summary([100 * (measure(b["accuracy"]) - measure(w["accuracy"])) for b, w in zip(better, worse)])


def shortfalls(runs: dict[str, list[dict]]) -> dict[str, dict]:
    """Every non-IID FedAvg variant against IID at the same E: the paired gap in points at the
    final round and over the last rounds."""
    out = {}
    for e in LOCAL_EPOCHS:
        iid = runs[label(None, e)]
        for a in ALPHAS[1:]:
            name = label(a, e)
            out[name] = {"iid": label(None, e), "final_pp": paired_gap(iid, runs[name], final),
                         "tail_pp": paired_gap(iid, runs[name], tail_mean)}
    return out


def recovery(runs: dict[str, list[dict]]) -> dict[str, dict]:
    """Each FedProx mu against FedAvg at the same alpha and E: its gain in points (paired), and
    the share of the IID gap it closes, from the medians of the last-rounds accuracy (1: all of
    it, 0: none, below 0: it widens the gap)."""
    fed, iid = runs[label(PROX_ALPHA, PROX_E)], runs[label(None, PROX_E)]
    gap = core.summary([tail_mean(r["accuracy"]) for r in iid])["median"] - \
        core.summary([tail_mean(r["accuracy"]) for r in fed])["median"]
    out = {}
    for mu in MUS:
        prox = runs[label(PROX_ALPHA, PROX_E, mu)]
        gain = paired_gap(prox, fed, tail_mean)
        out[label(PROX_ALPHA, PROX_E, mu)] = {
            "mu": mu, "final_pp": paired_gap(prox, fed, final), "tail_pp": gain,
            "share_of_gap": gain["median"] / (100 * gap) if gap > 0 else None}
    return out


def analyse(result: dict) -> dict:
    runs = result["runs"]
    result["variants"] = {name: summarise(rs, result["target"]) for name, rs in runs.items()}
    result["shortfall"] = shortfalls(runs)
    result["recovery"] = recovery(runs)
    return result


# --- the driver --------------------------------------------------------------------------------------
def _recorder(log: list[str]):
    """Bench.job's own mpirun line (one core per rank unless oversubscribed), kept for the report."""
    from hvd_trainer.runtime.launch_env import usable_cores
    from mpi_jobs import mpirun_command

    def build(np: int, program: list[str], env: dict[str, str]) -> list[str]:
        cmd = mpirun_command(np, program, env=env, bind_to="core" if np <= usable_cores() else "none")
        log.append(shlex.join(cmd))
        return cmd
    return build


def run(bench: Bench) -> dict:
    mode = bench.mode
    chosen = variants()
    result: dict[str, Any] = {
        "target": TARGET, "model": f"MLP {INPUTS}-{'-'.join(map(str, HIDDEN))}-{CLASSES}", "params": params(),
        "workers": WORKERS, "clients": CLIENTS, "fraction": FRACTION, "batch": BATCH, "rounds": rounds(mode),
        "seeds": seeds(mode), "tail": TAIL, "overrides": chosen, "runs": {name: [] for name in chosen},
        "commands": []}
    for seed in seeds(mode):
        args = ["--rounds", str(rounds(mode)), "--seed", str(seed), "--run-dir", bench.scratch(),
                *[a for name in chosen for a in ("--variant", name)]]
        out = bench.job("fedavg", args, WORKERS, command=_recorder(result["commands"]), timeout=900,
                        desc=f"fedavg seed {seed}")
        for name in chosen:
            result["runs"][name].append(dict(out[name], seed=seed))
        bench.log(f"[fedavg] seed {seed}: " + ", ".join(
            f"{n} {100 * out[n]['accuracy'][-1]:.1f}%" for n in chosen))
    return analyse(result)


# --- the report --------------------------------------------------------------------------------------
_q = core.median_range


def _rounds(v: dict, total: int) -> str:
    if v["rounds_to_target"] is None:
        return f"not in {total}"
    return _q(v["rounds_to_target"], ".0f", runs=v["runs"])


def markdown(result: dict, plots: Path) -> str:
    t, n, R = 100 * result["target"], len(result["seeds"]), result["rounds"]
    v = result["variants"]
    lines = [
        f"{result['model']} ({result['params']:,} parameters) on digits, {result['workers']} ranks on one host "
        f"simulating K = {result['clients']} clients, C = {result['fraction']:g} ({round(result['clients'] * result['fraction'])} "
        f"clients a round), batch {result['batch']}, SGD lr 0.05 momentum 0.9 (fresh each round), constant lr, "
        f"{R} rounds. {n} seeds ({', '.join(map(str, result['seeds']))}); a seed fixes the initial model, the split and "
        f"each round's clients, and its variants are paired. Median [min..max] over the seeds. Final: the held-out "
        f"accuracy after round {R}; last {result['tail']}: its mean over the last {result['tail']} rounds (non-IID "
        f"curves swing from round to round). Rounds to {t:g}%: the first round at or above it, over the seeds that "
        "reached it. Train s: seconds from the trainer's start to its last round (the first variant of a job "
        "also pays the warm-up).", "",
        f"| variant | final acc, % | last {result['tail']} rounds, % | rounds to {t:g}% | KB sent per rank per round "
        "| train s |", "|---|---|---|---|---|---|"]
    for name, s in v.items():
        b = "-" if s["bytes_per_round"] is None else f"{s['bytes_per_round']['median'] / 1e3:.1f}"
        lines.append(f"| {name} | {_q(s['final_accuracy'], '.1f', 100)} | {_q(s['tail_accuracy'], '.1f', 100)} | "
                     f"{_rounds(s, R)} | {b} | "
                     f"{_q(s['train_s'], '.1f')} |")
    per_round = v[label(None, 1)]["bytes_per_round"]
    if per_round:
        lines += ["", f"- Bytes: one allreduce a round of every parameter and the sample count, float64 (the "
                  f"strategy sums n_k w_k in double): {per_round['median'] / 1e3:.1f} KB per rank per round at 2 "
                  f"ranks (2(N-1)/N x 8 x {result['params'] + 1:,}), whatever alpha, E and mu; "
                  f"{R * per_round['median'] / 1e6:.2f} MB over {R} rounds. fp32 would halve it."]
    lines += ["", "**What non-IID data costs** (IID minus non-IID at the same E, paired by seed, points):", "",
              f"| variant | IID rounds to {t:g}% | its rounds to {t:g}% | final, pp | last {result['tail']}, pp |",
              "|---|---|---|---|---|"]
    for name, s in result["shortfall"].items():
        lines.append(f"| {name} | {_rounds(v[s['iid']], R)} | {_rounds(v[name], R)} | {_q(s['final_pp'], '+.1f')} | "
                     f"{_q(s['tail_pp'], '+.1f')} |")
    lines += ["", f"**What FedProx recovers** at alpha = {PROX_ALPHA:g}, E = {PROX_E} (FedProx minus FedAvg, paired "
              "by seed, points; share of the IID gap closed, from the medians of the last rounds):", "",
              f"| variant | final, pp | last {result['tail']}, pp | share of the IID gap closed |", "|---|---|---|---|"]
    for name, r in result["recovery"].items():
        share = "-" if r["share_of_gap"] is None else f"{100 * r['share_of_gap']:.0f}%"
        lines.append(f"| {name} | {_q(r['final_pp'], '+.1f')} | {_q(r['tail_pp'], '+.1f')} | {share} |")
    lines += ["", *findings(result)]
    _plot(result, plots / "fedavg_rounds.png")
    lines += ["", "![held-out accuracy against rounds](plots/fedavg_rounds.png)", "", "Commands (one job per seed, "
              "every variant in it):", "", "```", *result["commands"][:1], "```"]
    return "\n".join(lines)


def findings(result: dict) -> list[str]:
    """The sentences the report states, from the figures."""
    t, R, k = 100 * result["target"], result["rounds"], result["tail"]
    v, short = result["variants"], result["shortfall"]
    out = []
    for e in LOCAL_EPOCHS:
        worst = short[label(PROX_ALPHA, e)]
        out.append(f"- E = {e}: IID minus alpha = {PROX_ALPHA:g} is {worst['final_pp']['median']:+.1f} pp at round "
                   f"{R} ({worst['tail_pp']['median']:+.1f} pp over the last {k} rounds); minus alpha = 1 "
                   f"{short[label(1.0, e)]['tail_pp']['median']:+.1f} pp, minus alpha = 100 "
                   f"{short[label(100.0, e)]['tail_pp']['median']:+.1f} pp (last {k}). Rounds to {t:g}%: IID "
                   f"{_rounds(v[label(None, e)], R)}, alpha = {PROX_ALPHA:g} {_rounds(v[label(PROX_ALPHA, e)], R)}.")
    best = max(result["recovery"].items(), key=lambda kv: kv[1]["tail_pp"]["median"])
    name, r = best
    if r["tail_pp"]["median"] > 0 and r["tail_pp"]["min"] > 0:
        verdict = "recovers some of the gap on every seed"
    elif r["tail_pp"]["median"] > 0:
        verdict = "recovers some of the gap at the median, not on every seed"
    else:
        verdict = "recovers none of the gap"
    share = "" if r["share_of_gap"] is None else f", {100 * r['share_of_gap']:.0f}% of the IID gap"
    out.append(f"- FedProx: the best mu ({name}) {verdict}: {r['tail_pp']['median']:+.1f} pp over the last {k} "
               f"rounds [{r['tail_pp']['min']:+.1f}..{r['tail_pp']['max']:+.1f}]{share}; rounds to {t:g}% "
               f"{_rounds(v[name], R)} against FedAvg's {_rounds(v[label(PROX_ALPHA, PROX_E)], R)}.")
    return out


def _style(name: str) -> dict:
    """One colour and line per data split (and mu), the same in every panel."""
    splits = [label(a, 1) for a in ALPHAS] + [label(PROX_ALPHA, 1, m) for m in MUS]
    i = [k.rsplit(" ", 1)[0] for k in splits].index(name.rsplit(" ", 1)[0])  # the name without its E
    return {"color": f"C{i}", "linestyle": ["-", "--", "-.", ":", (0, (5, 1)), (0, (1, 1)), (0, (3, 1, 1, 1))][i % 7]}


def _plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(f"FedAvg, E = {e}", [label(a, e) for a in ALPHAS]) for e in LOCAL_EPOCHS]
    panels.append((f"FedProx, alpha = {PROX_ALPHA:g}, E = {PROX_E}",
                   [label(None, PROX_E), label(PROX_ALPHA, PROX_E), *[label(PROX_ALPHA, PROX_E, m) for m in MUS]]))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4), sharey=True)
    for ax, (title, names) in zip(axes, panels):
        for name in names:
            curves = [[100 * a for a in run["accuracy"]] for run in result["runs"][name]]
            x = list(range(1, len(curves[0]) + 1))
            mid = [sorted(c[j] for c in curves)[len(curves) // 2] for j in range(len(x))]
            style = _style(name)
            ax.plot(x, mid, label=name, **style)
            ax.fill_between(x, [min(c[j] for c in curves) for j in range(len(x))],
                            [max(c[j] for c in curves) for j in range(len(x))], color=style["color"], alpha=0.12)
        ax.axhline(100 * result["target"], color="gray", linestyle="--", linewidth=1)
        ax.set_xlabel("round")
        ax.set_title(title)
        ax.legend(fontsize=7, loc="lower right")
    axes[0].set_ylabel("held-out accuracy, %")
    fig.suptitle(f"digits, K = {result['clients']} clients, C = {result['fraction']:g}: median of "
                 f"{len(result['seeds'])} seeds, band min..max", fontsize=10)
    core.save_plot(fig, path)


# --- the job (every rank) ----------------------------------------------------------------------------
def job(rounds_: int, seed: int, run_dir: str, names: Sequence[str]) -> Optional[dict]:
    """Every named variant for ``rounds_`` rounds at ``seed``, one trainer run after another;
    rank 0 returns name -> its run (accuracy per round, bytes, seconds), the others None. Every rank
    calls with the same arguments (the trainer checks that the configs agree)."""
    from hvd_trainer import load_config, train
    from hvd_trainer.runtime.launch_env import launcher_rank

    table, out = variants(), {}
    for i, name in enumerate(names):
        run = Path(run_dir) / str(i)
        cfg = load_config(None, [*BASE, f"epochs={rounds_}", f"seed={seed}", f"run_dir={run}", *table[name]])
        summary = train(cfg)
        if launcher_rank() == 0:
            lines = (run / "metrics.jsonl").read_text().splitlines()
            rows = [r for r in map(json.loads, lines) if "test_accuracy" in r]
            if not summary.get("rounds") == len(rows) == rounds_:  # one evaluation a round, every round
                raise RuntimeError(f"{name}: {len(rows)} evaluations, {summary.get('rounds')} rounds, {rounds_} asked")
            out[name] = {"accuracy": [r["test_accuracy"] for r in rows], "bytes_sent": rows[-1].get("bytes_sent"),
                         "train_s": rows[-1]["elapsed_s"]}
    return out if launcher_rank() == 0 else None


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--job", action="store_true", required=True)
    p.add_argument("--rounds", type=int, required=True)
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--run-dir", required=True)
    p.add_argument("--variant", action="append", required=True)
    a = p.parse_args(argv)
    out = job(a.rounds, a.seed, a.run_dir, a.variant)
    if out is not None:
        core.emit(out)


if __name__ == "__main__":
    main(sys.argv[1:])
