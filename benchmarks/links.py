"""Parameter server against ring-allreduce under limited bandwidth, on the hosts testbed.

One rank per testbed host (``mpi_jobs.testbed``: network namespaces on a private bridge, each
host's link capped with ``tc tbf`` at every cap of ``mode.caps_mbit``), a wide MLP whose
gradient exchange dominates the step. For every cap:

  link       ``measure_mbit`` (one TCP flow, node1 -> node2) and alpha: half the round trip of a
             4-byte MPI ping-pong between two hosts
  exchange   the exchange alone, the model's byte count, numpy + mpi4py only:
             ring       ``MPI_Allreduce`` (SUM) over the N worker ranks
             ps k=K     a minimal equivalent of the trainer's ``ShardServer`` hot path: the flat
                        vector is cut into K contiguous shards (``ps.wire.partition``); each worker
                        posts an ``Irecv`` per shard for the reply and ``Isend``s each gradient
                        shard to its server; a server ``Irecv``s its shard from every worker, sums
                        them in rank order, applies an SGD update and ``Isend``s the shard back
  step       the real trainer (``train()`` with overrides) on the same MLP: ``strategy=horovod``
             on N hosts, ``strategy=ps ps.mode=sync ps.num_servers=K`` on N + K hosts (the last
             K ranks serve, so each server has a host of its own)

Prediction (:mod:`.costmodel`): each cap's link is ``Link(alpha, measured bandwidth)``; a step is
``step_s(compute, exchange)`` with no overlap (one core per rank at most: the exchange needs the
core that computes) and ``compute`` calibrated per variant on the fastest link (its measured step
minus the model's exchange there). The PS target compares the exchange alone with the model's
bound: ``ps_push_pull_s / measured`` (>= 0.8 on every capped link).

    hvd-bench --quick --only links     # as root (network namespaces); ~2 min here
"""
from __future__ import annotations

import argparse
import math
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from . import core, costmodel
from .core import Bench

TITLE = "Parameter server vs ring under limited bandwidth (hosts testbed, capped links)"
WORKERS = 2
SERVERS = (1, 2)
HIDDEN = [1024, 1024]
SHAPE = (1, 30, 30)   # 900 inputs: 1.98M parameters, a 7.9 MB gradient
CLASSES = 10
BATCH = 32            # per worker
NOMINAL_COMPUTE_S = 0.05  # only sizes the step counts before anything is measured
UNCAPPED_GUESS_MBIT = 10000.0
HOSTS = WORKERS + max(SERVERS)


def params() -> int:
    """The MLP's parameter count (weights and biases of its Linear layers)."""
    widths = [math.prod(SHAPE), *HIDDEN, CLASSES]
    return sum(a * b + b for a, b in zip(widths, widths[1:]))


GRAD_BYTES = 4 * params()


def variants() -> dict[str, tuple[int, int]]:
    """name -> (workers, servers); servers 0: the ring."""
    return {"ring": (WORKERS, 0), **{f"ps k={k}": (WORKERS, k) for k in SERVERS}}


def testbed_launcher(tb, commands: dict[str, str], name: str) -> Callable:
    """An mpirun command builder over the testbed's first ``np`` hosts, run from host 1, that
    records the first command of ``name`` (for the report)."""
    def command(np: int, program: list[str], env: dict[str, str]) -> list[str]:
        cmd = tb.on_host(tb.hosts[0], tb.mpirun_command(program, hosts=np, env=env))
        commands.setdefault(name, shlex.join(cmd))
        return cmd
    return command


def cap_label(cap: Optional[float]) -> str:
    if cap is None:
        return "uncapped"
    return f"{cap / 1000:g} Gbit" if cap >= 1000 else f"{cap:g} Mbit"


def exchange_s(name: str, nbytes: float, link: costmodel.Link) -> float:
    """The cost model's exchange time for a variant."""
    workers, servers = variants()[name]
    if servers == 0:
        return costmodel.ring_allreduce_s(nbytes, workers, link)
    return costmodel.ps_push_pull_s(nbytes, workers, servers, link)


def _nominal_link(cap: Optional[float]) -> costmodel.Link:
    return costmodel.Link(0.0, (cap or UNCAPPED_GUESS_MBIT) * 1e6 / 8)


def steps_per_epoch(mode: core.Mode, cap: Optional[float]) -> int:
    """Steps per timed epoch: ~``mode.steps`` x 0.1 s of the slowest variant (PS k=1), at least 1:
    at 100 Mbit one step of it moves 4 x 7.9 MB through the server's link (~2.6 s)."""
    slowest = max(NOMINAL_COMPUTE_S + exchange_s(v, GRAD_BYTES, _nominal_link(cap)) for v in variants())
    return max(1, min(mode.steps, round(mode.steps * 0.1 / slowest)))


def exchange_repeats(mode: core.Mode, cap: Optional[float]) -> int:
    """Timed repeats of each exchange: ``mode.repeats`` or ~6 s of the slowest, at least 3."""
    slowest = max(exchange_s(v, GRAD_BYTES, _nominal_link(cap)) for v in variants())
    return max(3, min(mode.repeats, int(6.0 / max(slowest, 1e-9))))


def timed_epochs(mode: core.Mode) -> int:
    return max(3, mode.blocks)


def count(mode: core.Mode) -> int:
    return len(mode.caps_mbit) * (1 + len(variants()))


# --- the driver --------------------------------------------------------------------------------------
def run(bench: Bench) -> dict:
    """Every cap on one testbed of ``HOSTS`` hosts (torn down on any exit, including errors)."""
    from mpi_jobs.testbed import Testbed, unavailable_reason

    reason = unavailable_reason()
    if reason is not None:
        return {"skipped": f"hosts testbed unavailable: {reason}"}
    mode = bench.mode
    result: dict[str, Any] = {
        "model": f"MLP {math.prod(SHAPE)}-{'-'.join(map(str, HIDDEN))}-{CLASSES}", "params": params(),
        "bytes": GRAD_BYTES, "workers": WORKERS, "servers": list(SERVERS), "batch_per_worker": BATCH,
        "timed_epochs": timed_epochs(mode), "caps": [], "commands": {}}
    with Testbed(hosts_count=HOSTS) as tb:
        def launcher(kind: str) -> Callable:
            return testbed_launcher(tb, result["commands"], kind)

        for cap in mode.caps_mbit:
            for h in tb.hosts:
                tb.limit_bandwidth(h, cap)
            label = cap_label(cap)
            point: dict[str, Any] = {"cap_mbit": cap, "label": label,
                                     "measured_mbit": tb.measure_mbit(tb.hosts[0], tb.hosts[1], nbytes=_probe_bytes(cap)),
                                     "steps_per_epoch": steps_per_epoch(mode, cap), "step_s": {}}
            reps = exchange_repeats(mode, cap)
            ex = bench.job("links", ["exchange", "--bytes", str(GRAD_BYTES), "--repeats", str(reps),
                                     "--warmup", "1", "--servers", ",".join(map(str, SERVERS))],
                           HOSTS, command=launcher("exchange"), timeout=600, desc=f"links {label} exchange")
            point["alpha_s"] = ex["alpha_s"]
            point["exchange_s"] = {name: core.summary(v) for name, v in ex["seconds"].items()}
            for name, (workers, servers) in variants().items():
                overrides = (["strategy=horovod"] if servers == 0 else
                             ["strategy=ps", "ps.mode=sync", f"ps.num_servers={servers}"])
                args = ["trainer", "--steps", str(point["steps_per_epoch"]), "--epochs", str(1 + timed_epochs(mode)),
                        "--run-dir", bench.scratch(), *[a for o in overrides for a in ("--override", o)]]
                sps = bench.job("links", args, workers + servers, command=launcher(f"trainer {name.split()[0]}"),
                                timeout=900, desc=f"links {label} {name}")
                point["step_s"][name] = core.summary([BATCH * workers / s for s in sps])
            result["caps"].append(point)
            bench.log(f"[links] {label}: {point['measured_mbit']:.0f} Mbit/s measured, "
                      + ", ".join(f"{n} {q['median'] * 1e3:.0f} ms" for n, q in point["step_s"].items()))
    return analyse(result)


def _probe_bytes(cap: Optional[float]) -> int:
    """~0.4 s of the cap (64 MB uncapped): long enough that the bucket's burst does not count."""
    return 64 << 20 if cap is None else max(4 << 20, int(cap * 1e6 / 8 * 0.4))


def analyse(result: dict) -> dict:
    """Add the model's prediction to a measured result: per-variant compute (calibrated on the
    fastest link), each point's predicted step and exchange with its relative error, and the PS
    exchange's bound / measured ratio on every capped link."""
    caps = result["caps"]
    nbytes = result["bytes"]

    def link(p: dict) -> costmodel.Link:
        return costmodel.Link(p["alpha_s"], p["measured_mbit"] * 1e6 / 8)

    calib = max(caps, key=lambda p: p["measured_mbit"])
    result["calibration_cap"] = calib["label"]
    result["compute_s"] = {v: max(0.0, q["median"] - exchange_s(v, nbytes, link(calib)))
                           for v, q in calib["step_s"].items()}
    result["alpha_s"] = statistics.median(p["alpha_s"] for p in caps)
    points, ratios = [], []
    for p in caps:
        p["predicted"] = {}
        for v, q in p["step_s"].items():
            comm = exchange_s(v, nbytes, link(p))
            step = costmodel.step_s(result["compute_s"][v], comm)
            ex = p["exchange_s"][v]["median"]
            row = {"step_s": step, "step_error": costmodel.relative_error(step, q["median"]),
                   "exchange_s": comm, "exchange_error": costmodel.relative_error(comm, ex),
                   "bound_vs_measured": comm / ex}
            p["predicted"][v] = row
            if p is not calib:  # the calibration point's step matches by construction
                points.append({"label": f"{v} step, {p['label']}", "bytes": nbytes,
                               "measured_s": q["median"], "predicted_s": step, "error": row["step_error"]})
            points.append({"label": f"{v} exchange alone, {p['label']}", "bytes": nbytes,
                           "measured_s": ex, "predicted_s": comm, "error": row["exchange_error"]})
            if v.startswith("ps") and p["cap_mbit"] is not None:
                ratios.append(row["bound_vs_measured"])
    result["points"] = points
    result["ps_vs_bound_min"] = min(ratios) if ratios else None
    return result


# --- the report --------------------------------------------------------------------------------------
def _ms(q: dict) -> str:
    return f"{q['median'] * 1e3:.0f} [{q['min'] * 1e3:.0f}..{q['max'] * 1e3:.0f}]"


def markdown(result: dict, plots: Path) -> str:
    if "skipped" in result:
        return f"Skipped: {result['skipped']}"
    n, ratio = result["workers"], result.get("ps_vs_bound_min")
    lines = [
        f"{result['model']} ({result['params'] / 1e6:.2f}M parameters, {result['bytes'] / 2 ** 20:.1f} MiB of "
        f"gradient), batch {result['batch_per_worker']} per worker, {n} workers; one rank per testbed host, "
        "every host's link capped (`tc tbf`, both directions). Step: the trainer's, median over "
        f"{result['timed_epochs']} timed epochs [min..max]. Exchange alone: median over its repeats [min..max]. "
        "Predicted: `costmodel` with the cap's measured link (one TCP flow) and alpha (half a 4-byte MPI round "
        f"trip), compute per variant calibrated on the {result['calibration_cap']} link (step minus the "
        "model's exchange there), no overlap.", "",
        "Compute (calibrated): " + ", ".join(f"{v} {c * 1e3:.0f} ms" for v, c in result["compute_s"].items()) + ".", ""]
    for p in result["caps"]:
        lines += [f"**{p['label']}** (measured {p['measured_mbit']:.0f} Mbit/s, alpha "
                  f"{p['alpha_s'] * 1e6:.0f} µs, {p['steps_per_epoch']} steps/epoch)", "",
                  "| strategy | N | k | step ms, measured | step ms, predicted | error | exchange ms, measured "
                  "| exchange ms, model | model / measured |", "|---|---|---|---|---|---|---|---|---|"]
        for v, q in p["step_s"].items():
            pr, k = p["predicted"][v], variants()[v][1]
            err = "(calibration)" if p["label"] == result["calibration_cap"] else f"{pr['step_error']:+.0%}"
            lines.append(f"| {'horovod (ring)' if k == 0 else 'ps sync'} | {n} | {k or '-'} | {_ms(q)} | "
                         f"{pr['step_s'] * 1e3:.0f} | {err} | {_ms(p['exchange_s'][v])} | {pr['exchange_s'] * 1e3:.0f} "
                         f"| {pr['bound_vs_measured']:.2f} |")
        lines.append("")
    if ratio is not None:
        lines += [f"- PS push+pull alone on capped links, the model's bound / measured (worst cap and k): "
                  f"**{ratio:.2f}** (target >= 0.8: {'met' if ratio >= 0.8 else 'NOT met'}).",
                  "- A model / measured ratio above 1 (faster than the bound) comes from the cap itself: `tc tbf` "
                  "lets a full bucket (20 ms of the rate, at least 64 KiB) through at line rate, and the bucket "
                  "refills while ranks wait at the barrier between repeats. At 1 Gbit that is 2.5 MB of each "
                  "link's 7.9 MB; at 100 Mbit, 0.25 MB.", ""]
    _plot(result, plots / "links_step_time.png")
    lines += ["![step time vs link cap](plots/links_step_time.png)", "", "Commands (first cap of each kind):", ""]
    lines += [f"- {kind}: `{cmd}`" for kind, cmd in result.get("commands", {}).items()]
    return "\n".join(lines)


def _plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    caps = sorted(result["caps"], key=lambda p: p["measured_mbit"])
    mbit = [p["measured_mbit"] for p in caps]
    grid = [mbit[0] * (mbit[-1] / mbit[0]) ** (i / 60) for i in range(61)] if len(mbit) > 1 else mbit
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, title in ((axes[0], "step_s", "training step"), (axes[1], "exchange_s", "exchange alone")):
        for i, v in enumerate(caps[0][key]):
            color = f"C{i}"
            qs = [p[key][v] for p in caps]
            med = [q["median"] * 1e3 for q in qs]
            ax.errorbar(mbit, med, yerr=[[m - q["min"] * 1e3 for m, q in zip(med, qs)],
                                         [q["max"] * 1e3 - m for m, q in zip(med, qs)]],
                        fmt="o", color=color, label=f"{v} measured")
            model = [exchange_s(v, result["bytes"], costmodel.Link(result["alpha_s"], b * 1e6 / 8)) for b in grid]
            if key == "step_s":
                model = [costmodel.step_s(result["compute_s"][v], c) for c in model]
            ax.plot(grid, [m * 1e3 for m in model], "-", color=color, alpha=0.7, label=f"{v} model")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("link, measured Mbit/s (caps: " + ", ".join(p["label"] for p in caps) + ")", fontsize=8)
        ax.set_ylabel("ms")
        ax.set_title(f"{title}, {result['workers']} workers")
        ax.legend(fontsize=7)
    core.save_plot(fig, path)


# --- jobs (one rank per host) -----------------------------------------------------------------------
def _sleep_wait(req) -> None:
    """Wait without spinning: an idle rank must not take a core from a host that computes."""
    while not req.Test():
        time.sleep(0.001)


def job_exchange(nbytes: int, repeats: int, warmup: int, servers: Sequence[int]) -> Optional[dict]:
    """Ranks 0..N-1 are workers; for ``ps k=K`` the K ranks after them serve (the job has
    N + max(K) ranks; ranks not in a variant wait asleep). Every rank must call."""
    import numpy as np
    from mpi4py import MPI

    world = MPI.COMM_WORLD
    rank, size = world.Get_rank(), world.Get_size()
    workers = size - max(servers)
    is_worker = rank < workers
    wcomm = world.Split(0 if is_worker else 1, rank)
    n = nbytes // 4
    out: dict[str, list[float]] = {}

    # alpha: a 4-byte ping-pong between ranks 0 and 1 (two hosts)
    small, rtts = np.zeros(1, dtype=np.float32), []
    _sleep_wait(world.Ibarrier())
    for i in range(220):
        t0 = time.perf_counter()
        if rank == 0:
            world.Send(small, dest=1)
            world.Recv(small, source=1)
        elif rank == 1:
            world.Recv(small, source=0)
            world.Send(small, dest=0)
        if i >= 20:
            rtts.append(time.perf_counter() - t0)

    grad = np.full(n, 1.0 + rank, dtype=np.float32)
    total = np.empty(n, dtype=np.float32)

    def ring() -> None:
        if is_worker:
            wcomm.Allreduce(grad, total, op=MPI.SUM)

    out["ring"] = _timed(world, ring, warmup, repeats)
    for k in servers:
        out[f"ps k={k}"] = _timed(world, _push_pull(world, grad, workers, k), warmup, repeats)
    alpha = statistics.median(rtts) / 2 if rank == 0 else 0.0
    everyone = world.gather(out, root=0)
    if rank != 0:
        return None
    # a repeat lasts until its slowest worker is done
    seconds = {name: [max(r[name][i] for r in everyone[:workers]) for i in range(repeats)] for name in out}
    return {"alpha_s": alpha, "seconds": seconds}


def _push_pull(world, grad, workers: int, k: int) -> Callable[[], None]:
    """One synchronous PS exchange over ``k`` servers (world ranks ``workers..workers+k-1``), as
    the trainer's ``ShardServer`` moves it: a worker posts every shard's reply receive, then
    pushes every gradient shard, and waits for all; a server receives its shard from every
    worker, sums them in rank order, takes an SGD step and replies to each. Ranks outside the
    variant do nothing."""
    import numpy as np
    from mpi4py import MPI

    rank, n = world.Get_rank(), grad.size
    shards = _partition(n, k)
    me = rank - workers
    if rank < workers:
        params = np.zeros(n, dtype=np.float32)

        def worker() -> None:
            reqs = [world.Irecv([params[lo:hi], MPI.FLOAT], source=workers + j, tag=1)
                    for j, (lo, hi) in enumerate(shards)]
            reqs += [world.Isend([grad[lo:hi], MPI.FLOAT], dest=workers + j, tag=0)
                     for j, (lo, hi) in enumerate(shards)]
            MPI.Request.Waitall(reqs)
        return worker
    if me >= k:
        return lambda: None
    lo, hi = shards[me]
    shard = np.zeros(hi - lo, dtype=np.float32)
    bufs = [np.empty(hi - lo, dtype=np.float32) for _ in range(workers)]
    acc = np.empty(hi - lo, dtype=np.float32)
    lr = np.float32(0.01 / workers)

    def server() -> None:
        MPI.Request.Waitall([world.Irecv([b, MPI.FLOAT], source=w, tag=0) for w, b in enumerate(bufs)])
        np.copyto(acc, bufs[0])
        for b in bufs[1:]:
            np.add(acc, b, out=acc)
        np.subtract(shard, lr * acc, out=shard)
        MPI.Request.Waitall([world.Isend([shard, MPI.FLOAT], dest=w, tag=1) for w in range(workers)])
    return server


def _partition(total: int, parts: int) -> list[tuple[int, int]]:
    """The trainer's shard ranges (``hvd_trainer.strategies.ps.wire.partition``), without
    importing the trainer (and torch) into a numpy-only job."""
    bounds = [total * j // parts for j in range(parts + 1)]
    return [(bounds[j], bounds[j + 1]) for j in range(parts)]


def _timed(world, fn: Callable[[], None], warmup: int, repeats: int) -> list[float]:
    """Seconds of each timed repeat on this rank; every repeat starts after a (sleeping) barrier."""
    return core.timed(fn, warmup, repeats, barrier=lambda: _sleep_wait(world.Ibarrier()))


def job_trainer(steps: int, epochs: int, overrides: list[str], run_dir: str) -> Optional[list[float]]:
    """``train()`` on a fixed batch; one epoch is ``steps`` steps; samples/s of every epoch after
    the first (the warm-up). Every rank calls; rank 0 returns."""
    import torch
    from mpi4py import MPI
    from torch.utils.data import TensorDataset

    from hvd_trainer import load_config, train
    from hvd_trainer.models import MLP
    from hvd_trainer.runtime.launch_env import launcher_rank

    torch.manual_seed(0)
    model = MLP(math.prod(SHAPE), HIDDEN, CLASSES)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(BATCH, *SHAPE, generator=g), torch.randint(0, CLASSES, (BATCH,), generator=g)
    cfg = load_config(None, [
        "model.name=mlp", f"model.hidden={HIDDEN}", "optim.name=sgd", "optim.lr=0.01", "optim.momentum=0.9",
        f"batch_size={BATCH}", f"epochs={epochs}", "data.shuffle=false", "checkpoint.every_epochs=0",
        "checkpoint.resume=never", "runtime.progress=false", "runtime.threads=1", f"run_dir={run_dir}", *overrides])
    workers = MPI.COMM_WORLD.Get_size() - (cfg.ps.num_servers if cfg.strategy == "ps" else 0)
    data = TensorDataset(x.repeat(steps * workers, 1, 1, 1), y.repeat(steps * workers))
    train(cfg, model=model, train_data=data, test_data=TensorDataset(x[:4], y[:4]))
    return core.epoch_throughputs(run_dir) if launcher_rank() == 0 else None


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--job", required=True, choices=["exchange", "trainer"])
    p.add_argument("--bytes", type=int, default=GRAD_BYTES)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--servers", default="1")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--override", action="append", default=[])
    p.add_argument("--run-dir", default="")
    a = p.parse_args(argv)
    if a.job == "exchange":
        out: Any = job_exchange(a.bytes, a.repeats, a.warmup, [int(k) for k in a.servers.split(",")])
    else:
        out = job_trainer(a.steps, a.epochs, a.override, a.run_dir)
    if out is not None:
        core.emit(out)


if __name__ == "__main__":
    main(sys.argv[1:])
