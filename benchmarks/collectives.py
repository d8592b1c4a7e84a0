"""Collectives: bus bandwidth against message size and small-message latency, for every way the
trainer can exchange gradients, with raw ``MPI_Allreduce`` as the ceiling.

Each path is one job on ``np`` ranks that sweeps every size (float32 buffers, allocated once per
size): untimed warm-up rounds, then timed rounds of ``iters`` back-to-back ops, ranks lined up by
a barrier before each round. Bus bandwidth follows nccl-tests: algbw x 2(n-1)/n.

Paths:
  mpi                  mpi4py ``Allreduce(IN_PLACE)``: the ceiling
  horovod-mpi/stock    ``hvd.allreduce_async_`` + ``hvd.synchronize``, Horovod's and Open MPI's
                       defaults (1 ms cycle, MPI busy-polls)
  horovod-mpi/trainer  the same op with the trainer's settings: the trainer's gradient path
  horovod-gloo/stock   the stock op under ``horovodrun --gloo`` (Gloo controller and ops)
  horovod-gloo/trainer the trainer's path under ``horovodrun --gloo``
  torch-gloo           ``torch.distributed.all_reduce`` over gloo (what DDP uses)
  ps                   the parameter server's push+pull with the real ``ShardServer`` (sync rule,
                       SGD step on the shard): np-1 workers and one server rank
"""
from __future__ import annotations

import argparse
import os
import statistics
from typing import Any

from . import core
from .core import KB, MB, Bench

TITLE = "Collectives: bus bandwidth and latency"
NP = 2


def _settings(trainer: bool) -> dict[str, str]:
    """The environment the trainer's defaults produce, or Horovod 0.28.1's and Open MPI's own."""
    from hvd_trainer.config import HorovodConfig
    from hvd_trainer.runtime.launch_env import apply_torch_defaults
    from hvd_trainer.strategies.horovod import apply_horovod_env

    if trainer:
        env = apply_horovod_env(HorovodConfig(), environ={}) | apply_torch_defaults(environ={})
        return {k: v for k, v in env.items() if v is not None}
    return {"HOROVOD_CYCLE_TIME": "1", "OMPI_MCA_mpi_yield_when_idle": "0", "HOROVOD_WAKE_ON_WAIT": "0"}


def paths() -> dict[str, dict[str, Any]]:
    """name -> how to start its job."""
    return {
        "mpi": {"job": "mpi", "np": NP, "env": _settings(False)},
        "horovod-mpi/stock": {"job": "horovod-stock", "np": NP, "env": _settings(False)},
        "horovod-mpi/trainer": {"job": "horovod-trainer", "np": NP, "env": _settings(True)},
        "horovod-gloo/stock": {"job": "horovod-stock", "np": NP, "env": _settings(False), "launcher": "horovodrun-gloo"},
        "horovod-gloo/trainer": {"job": "horovod-trainer", "np": NP, "env": _settings(True), "launcher": "horovodrun-gloo"},
        "torch-gloo": {"job": "torch-gloo", "np": NP, "env": {}},
        "ps": {"job": "ps", "np": NP + 1, "env": {}},
    }


def count(mode: core.Mode) -> int:
    return len(paths()) * mode.rounds


def run(bench: Bench) -> dict:
    mode = bench.mode
    sizes = sorted(set(mode.sizes) | set(mode.latency_sizes))
    args = ["--sizes", ",".join(map(str, sizes)), "--warmup", str(mode.warmup), "--repeats", str(mode.repeats)]
    raw: dict[str, dict[str, list[float]]] = {name: {} for name in paths()}
    for r in range(mode.rounds):  # alternate the paths, so drift on a noisy machine hits all alike
        for name, spec in paths().items():
            out = bench.job("collectives", [spec["job"], *args], spec["np"], env=spec["env"],
                            launcher=spec.get("launcher", "mpirun"), desc=f"collectives {name} ({r + 1}/{mode.rounds})")
            for size, times in out["times"].items():
                raw[name].setdefault(size, []).extend(times)
    result: dict[str, Any] = {"np": NP, "sizes": sizes, "paths": {}}
    for name, per_size in raw.items():
        n = NP  # ps: the allreduce it stands in for is across its NP workers
        rows = {}
        for size, times in per_size.items():
            s = core.summary(times)
            rows[size] = {"seconds": s, "busbw": core.busbw(int(size), s["median"], n)}
        result["paths"][name] = {"env": paths()[name]["env"], "np": paths()[name]["np"], "points": rows}
    result["ratios_16MB"] = ratios(result, 16 * MB)
    return result


def ratios(result: dict, size: int) -> dict[str, float]:
    """busbw of every path at ``size`` as a fraction of raw MPI's, in the same run."""
    key = str(size)
    pts = result["paths"]
    if key not in pts["mpi"]["points"]:
        return {}
    ceiling = pts["mpi"]["points"][key]["busbw"]
    return {name: p["points"][key]["busbw"] / ceiling for name, p in pts.items() if key in p["points"]}


def points(result: dict, name: str, min_size: int = 0) -> list[tuple[float, float]]:
    """``(bytes, median seconds)`` of one path, for the cost model."""
    return [(int(s), p["seconds"]["median"]) for s, p in result["paths"][name]["points"].items() if int(s) >= min_size]


# --- report -------------------------------------------------------------------------------------------
def _size(n: int) -> str:
    return f"{n // MB} MB" if n >= MB else f"{n // KB} KB" if n >= KB else f"{n} B"


def markdown(result: dict, plots) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = result["paths"]
    big = [s for s in result["sizes"] if s >= 4 * KB]
    small = [s for s in result["sizes"] if s <= 4 * KB]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, p in pts.items():
        xs = [s for s in big if str(s) in p["points"]]
        ys = [p["points"][str(s)]["busbw"] / 1e9 for s in xs]
        ax.plot(xs, ys, marker="o", label=name, linewidth=3 if name == "mpi" else 1.5,
                color="black" if name == "mpi" else None, linestyle="--" if name == "mpi" else "-")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("message size (bytes, float32)")
    ax.set_ylabel("bus bandwidth (GB/s)")
    ax.set_title(f"allreduce bus bandwidth, {result['np']} ranks (raw MPI dashed: the ceiling)")
    ax.legend(fontsize=8)
    ax.grid(True, alpha=0.3)
    core.save_plot(fig, plots / "collectives_busbw.png")

    lines = ["![bus bandwidth](plots/collectives_busbw.png)", "",
             f"Bus bandwidth (GB/s, median; nccl-tests definition) at {result['np']} ranks; in brackets the "
             "fraction of raw MPI at that size:", "",
             "| path | " + " | ".join(_size(s) for s in big) + " |",
             "|---|" + "---|" * len(big)]
    mpi = pts["mpi"]["points"]
    for name, p in pts.items():
        cells = []
        for s in big:
            q = p["points"].get(str(s))
            cells.append("" if q is None else f"{q['busbw'] / 1e9:.2f} ({q['busbw'] / mpi[str(s)]['busbw']:.2f}x)")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "Latency per op for small messages (µs, median, [min..max]):", "",
              "| path | " + " | ".join(_size(s) for s in small) + " |", "|---|" + "---|" * len(small)]
    for name, p in pts.items():
        cells = []
        for s in small:
            q = p["points"].get(str(s))
            cells.append("" if q is None else
                         f"{q['seconds']['median'] * 1e6:.1f} [{q['seconds']['min'] * 1e6:.0f}..{q['seconds']['max'] * 1e6:.0f}]")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "Settings of each path (environment of its ranks):", ""]
    for name, p in pts.items():
        env = " ".join(f"{k}={v}" for k, v in sorted(p["env"].items())) or "(defaults)"
        lines.append(f"- `{name}` (np {p['np']}): {env}")
    return "\n".join(lines)


# --- jobs ---------------------------------------------------------------------------------------------
MAX_ITERS = 200


def _sweep(sizes, warmup, repeats, make_op, barrier, rank) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Seconds per op at every size; and the check of each size's op (:func:`_check`)."""
    out, checks = {}, {}
    for size in sizes:
        op, buf = make_op(size)
        checks[str(size)] = _check(op, buf, rank)
        out[str(size)] = core.timed(op, warmup, repeats, core.iters_for(size, cap=MAX_ITERS), barrier)
    return out, checks


def _check(op, buf, rank) -> list[float]:
    """One op with ``rank + 1`` in every element of every rank's buffer: ``[min, max]`` of the
    result (a sum over n ranks gives n(n+1)/2 everywhere), then the buffer back to ones."""
    buf[:] = rank + 1
    op()
    result = [float(buf.min()), float(buf.max())]
    buf[:] = 1
    return result


def job_mpi(sizes, warmup, repeats):
    import numpy as np
    from mpi4py import MPI

    comm = MPI.COMM_WORLD

    def make(size):
        buf = np.ones(max(1, size // 4), dtype=np.float32)
        return (lambda: comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)), buf

    return (comm.rank, *_sweep(sizes, warmup, repeats, make, comm.Barrier, comm.rank))


def job_horovod(sizes, warmup, repeats):
    import horovod.torch as hvd
    import torch

    hvd.init()
    torch.set_num_threads(1)

    def make(size):
        t = torch.ones(max(1, size // 4), dtype=torch.float32)
        name = f"bench.{size}"

        def op():
            hvd.synchronize(hvd.allreduce_async_(t, name=name, op=hvd.Sum))
        return op, t

    rank = hvd.rank()
    out, checks = _sweep(sizes, warmup, repeats, make, hvd.barrier, rank)
    hvd.shutdown()
    return rank, out, checks


def job_torch_gloo(sizes, warmup, repeats):
    import torch
    import torch.distributed as dist

    comm = core.init_gloo()
    torch.set_num_threads(1)

    def make(size):
        t = torch.ones(max(1, size // 4), dtype=torch.float32)
        return (lambda: dist.all_reduce(t)), t

    out, checks = _sweep(sizes, warmup, repeats, make, dist.barrier, comm.rank)
    dist.destroy_process_group()
    return comm.rank, out, checks


def job_ps(sizes, warmup, repeats):
    """Workers push a gradient and pull the parameters of one shard server, the trainer's wire
    and its real server (sync rule, an SGD step per push round). The check: the first push of
    a fresh (zero) shard, ``rank + 1`` from each worker, pulls ``-lr * mean`` back."""
    import numpy as np
    from mpi4py import MPI

    from hvd_trainer.config import OptimConfig
    from hvd_trainer.strategies.ps.rules import make_rule
    from hvd_trainer.strategies.ps.server import Link, ShardServer
    from hvd_trainer.strategies.ps.wire import CTRL_DONE, TAG_CTRL, TAG_DATA, Waiter

    world = MPI.COMM_WORLD
    rank, size_ = world.Get_rank(), world.Get_size()
    server, workers = size_ - 1, list(range(size_ - 1))
    ctrl = world.Dup()
    waiter = Waiter(ctrl, 120.0, lambda r: f"rank {r}")
    wcomm = world.Split(color=int(rank == server), key=rank)
    out, checks = {}, {}
    for size in sizes:
        n = max(1, size // 4)
        data = world.Dup()  # one per size: a server's last posted receive must not match the next size's push
        if rank == server:
            rule = make_rule("sync", workers, 0, 0, 0)
            ShardServer(np.zeros(n, dtype=np.float32), (0, n), OptimConfig(), 1,
                        lambda step: 1.0, rule, Link(data, ctrl, waiter, workers)).serve()
            data.Free()
            continue
        grad, params = np.ones(n, dtype=np.float32), np.empty(n, dtype=np.float32)
        clock = [0]

        def op():
            clock[0] += 1
            reqs = [data.Irecv([params, MPI.FLOAT], source=server, tag=MPI.ANY_TAG),
                    data.Isend([grad, MPI.FLOAT], dest=server, tag=TAG_DATA + clock[0])]
            waiter.wait_all(reqs, [server])

        grad[:] = rank + 1
        op()
        checks[str(size)] = [float(params.min()), float(params.max())]
        grad[:] = 1
        out[str(size)] = core.timed(op, warmup, repeats, core.iters_for(size, cap=MAX_ITERS), wcomm.Barrier)
        waiter.wait_all([ctrl.Isend(np.array([CTRL_DONE, 0], dtype=np.int64), dest=server, tag=TAG_CTRL)], [server])
        data.Free()
    waiter.close()
    return rank, out, checks


def main() -> None:
    global MAX_ITERS
    p = argparse.ArgumentParser()
    p.add_argument("--job", required=True, choices=["mpi", "horovod-stock", "horovod-trainer", "torch-gloo", "ps"])
    p.add_argument("--sizes", required=True)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--max-iters", type=int, default=MAX_ITERS, help="ops per timed round, at most")
    a = p.parse_args()
    MAX_ITERS = a.max_iters
    sizes = [int(s) for s in a.sizes.split(",")]
    if a.job == "mpi":
        rank, times, checks = job_mpi(sizes, a.warmup, a.repeats)
    elif a.job.startswith("horovod"):
        rank, times, checks = job_horovod(sizes, a.warmup, a.repeats)  # settings differ by environment
    elif a.job == "torch-gloo":
        rank, times, checks = job_torch_gloo(sizes, a.warmup, a.repeats)
    else:
        rank, times, checks = job_ps(sizes, a.warmup, a.repeats)
    if rank == 0:  # check: one op's result, [min, max] (see _check), for the tests
        core.emit({"times": times, "median_s": {s: statistics.median(t) for s, t in times.items()},
                   "check": checks, "pid": os.getpid()})


if __name__ == "__main__":
    main()
