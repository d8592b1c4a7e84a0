"""Training throughput and scaling, against the machine's limit.

Same CNN (the built-in ResNet [64, 128, 256], 1.22M parameters), batch 32 per rank, a fixed
random batch (no data loading), fp32, SGD with momentum, one thread per rank, one rank per core.
Inputs are 16x16 by default: a short step (~65 ms here), where communication shows.

The **limit** is what the machine can do at all: as many independent single-process loops as
there are ranks, running at once with no communication (plain torch, the same model, batch and
optimizer); its samples/s is the sum of theirs. Every other variant is reported as a ratio to
the limit at the same rank count, measured in the same run (rounds alternate the variants).
The limit also times its forward+backward and its update; each trainer variant's own per-step
breakdown (data, compute, exchange, optimizer, other) is set against them to say why the
variant falls short (:mod:`.breakdown`).

Variants (``hvd-train`` through the library API unless named "hand"):
  limit                 independent processes, no communication
  horovod               the default strategy with its defaults
  horovod/fp16          horovod.compression=fp16
  horovod/stock         Horovod's and Open MPI's own settings (1 ms cycle, busy-polling MPI)
  horovod/no-wake       horovod.wake_on_wait=false: requests wait for the next cycle (stock)
  horovod/grouped       horovod.groups=1: one grouped allreduce after backward
  horovod/cycle=N ms    another negotiation cycle
  ddp                   strategy=ddp (torch DDP over gloo)
  ps/sync, ps/async,    strategy=ps, one extra server rank (np workers + 1 server); ssp with
  ps/ssp                ps.staleness=2
  hand/horovod          a minimal hand-written Horovod loop (DistributedOptimizer), stock settings
  hand/ddp              a minimal hand-written DDP loop over gloo
  hand/ps-naive         the simplest correct mpi4py parameter server: blocking Send/Recv of whole
                        flat vectors, the server (last rank) takes the workers in turn
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
from typing import Any, Optional

from . import breakdown, core
from .core import Bench

TITLE = "Training throughput and scaling against the limit"
BATCH = 32
CHANNELS = [64, 128, 256]
HW = 16


def _stock() -> dict[str, str]:
    return {"HOROVOD_CYCLE_TIME": "1", "OMPI_MCA_mpi_yield_when_idle": "0", "HOROVOD_WAKE_ON_WAIT": "0"}


def variants(mode: core.Mode, np: int) -> dict[str, dict[str, Any]]:
    """name -> job spec for ``np`` training ranks."""
    out: dict[str, dict[str, Any]] = {
        # the machine's best: also with torch's huge-page allocations, as the trainer runs
        "limit": {"job": "limit", "env": {"THP_MEM_ALLOC_ENABLE": "1"}},
        "horovod": {"job": "trainer", "overrides": ["strategy=horovod"]},
        "horovod/fp16": {"job": "trainer", "overrides": ["strategy=horovod", "horovod.compression=fp16"]},
        "ddp": {"job": "trainer", "overrides": ["strategy=ddp"]},
        "ps/sync": {"job": "trainer", "overrides": ["strategy=ps", "ps.mode=sync"], "servers": 1},
        "ps/async": {"job": "trainer", "overrides": ["strategy=ps", "ps.mode=async"], "servers": 1},
        "ps/ssp": {"job": "trainer", "overrides": ["strategy=ps", "ps.mode=ssp", "ps.staleness=2"], "servers": 1},
        "hand/horovod": {"job": "hand-horovod", "env": _stock()},
        "hand/ddp": {"job": "hand-ddp"},
        "hand/ps-naive": {"job": "hand-ps", "servers": 1},
    }
    if mode.name == "full":  # the exchange designs tried for the default (REPORT: what was tried)
        out["horovod/stock"] = {"job": "trainer", "overrides": ["strategy=horovod"], "env": _stock()}
        out["horovod/no-wake"] = {"job": "trainer", "overrides": ["strategy=horovod", "horovod.wake_on_wait=false"]}
        out["horovod/grouped"] = {"job": "trainer", "overrides": ["strategy=horovod", "horovod.groups=1"]}
        for ms in (1, 5):
            out[f"horovod/cycle={ms}ms"] = {"job": "trainer", "overrides": ["strategy=horovod", f"horovod.cycle_time_ms={ms}"]}
    if np == 1:  # one rank: nothing to exchange; the trainer's own overhead against plain torch
        out = {k: v for k, v in out.items() if k in ("limit", "horovod", "ddp")}
    return out


RANKS = (1, 2)


def count(mode: core.Mode) -> int:
    return mode.rounds * sum(len(variants(mode, n)) for n in RANKS)


def run(bench: Bench) -> dict:
    mode = bench.mode
    raw: dict[str, dict[str, list[float]]] = {str(n): {} for n in RANKS}
    times: dict[str, dict[str, list]] = {str(n): {} for n in RANKS}  # one breakdown per round
    failed: dict[str, str] = {}  # "np/variant" -> the error: a broken variant loses only its own row
    for r in range(mode.rounds):
        for n in RANKS:
            for name, spec in variants(mode, n).items():
                if f"{n}/{name}" in failed:
                    bench.tick(f"throughput np={n} {name} (failed before)")
                    continue
                np = n + spec.get("servers", 0)
                run_dir = bench.scratch()
                args = [spec["job"], "--steps", str(mode.steps), "--blocks", str(mode.blocks), "--run-dir", run_dir]
                for o in spec.get("overrides", []):
                    args += ["--override", o]
                try:
                    out = bench.job("throughput", args, np, env=spec.get("env"),
                                    desc=f"throughput np={n} {name} ({r + 1}/{mode.rounds})")
                except core.BenchError as err:
                    if name == "limit":  # every ratio needs it
                        raise
                    bench.log(f"[throughput] np={n} {name} FAILED: {str(err)[:300]}")
                    failed[f"{n}/{name}"] = str(err)[-3000:]
                    continue
                raw[str(n)].setdefault(name, []).extend(out["samples_per_s"])
                if spec["job"] == "trainer":  # rank 0 wrote its metrics.jsonl into run_dir
                    times[str(n)].setdefault(name, []).append(breakdown.read_run(run_dir))
                elif "time" in out:
                    times[str(n)].setdefault(name, []).append(out["time"])
    result: dict[str, Any] = {"model": f"ResNet {CHANNELS} on 3x{HW}x{HW}", "params": _param_count(),
                              "batch_per_rank": BATCH, "ranks": {}, "failed_variants": failed}
    for n, per in raw.items():
        limit = statistics.median(per["limit"])
        result["ranks"][n] = {name: dict(core.summary(v), vs_limit=statistics.median(v) / limit)
                              for name, v in per.items()}
        explain_gaps(result["ranks"][n], times[n], int(n))
    two = result["ranks"].get("2", {})
    for label, (a, b) in {"horovod_vs_ddp": ("horovod", "ddp"), "ps_sync_vs_naive": ("ps/sync", "hand/ps-naive")}.items():
        if a in two and b in two:
            result[label] = two[a]["median"] / two[b]["median"]
    return result


def explain_gaps(per: dict[str, dict[str, Any]], times: dict[str, list], ranks: int) -> None:
    """Into each variant's entry: ``time``, its breakdown's median over rounds; and for the
    trainer variants ``gap``, why they are slower than the limit (:func:`breakdown.explain`)."""
    for name, samples in times.items():
        t = breakdown.median_over(samples)
        if t is not None and name in per:
            per[name]["time"] = t
    if "limit" not in per:
        return
    limit = breakdown.limit_time(per["limit"], ranks, BATCH)
    for name, q in per.items():
        if name != "limit" and q.get("time"):
            q["gap"] = breakdown.explain(q["time"], limit)


def _param_count() -> int:
    model, _, _ = _model_and_batch()
    return sum(p.numel() for p in model.parameters())


def markdown(result: dict, plots) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ranks = result["ranks"]
    names = list(ranks["2"])
    lines = [f"{result['model']} ({result['params'] / 1e6:.2f}M parameters), batch {result['batch_per_rank']} "
             "per rank, one thread per rank. Samples/s: median over all timed blocks [min..max]; "
             "`x limit`: the median as a fraction of the limit at the same rank count, same run.", "",
             "| variant | 1 rank | x limit | 2 ranks | x limit |", "|---|---|---|---|---|"]
    for name in names:
        cells = []
        for n in ("1", "2"):
            q = ranks.get(n, {}).get(name)
            cells += ["", ""] if q is None else [f"{q['median']:.1f} [{q['min']:.1f}..{q['max']:.1f}]",
                                                 f"**{q['vs_limit']:.3f}**" if name == "horovod" else f"{q['vs_limit']:.3f}"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if "horovod_vs_ddp" in result or "ps_sync_vs_naive" in result:
        lines.append("")
    if "horovod_vs_ddp" in result:
        lines += [f"- The default strategy against DDP at 2 ranks: **{result['horovod_vs_ddp']:.3f}x** (target >= 1.0)."]
    if "ps_sync_vs_naive" in result:
        lines += [f"- The PS in sync mode against the naive mpi4py PS (2 workers + 1 server on 2 cores): "
                  f"**{result['ps_sync_vs_naive']:.3f}x** (target >= 1.0)."]
    failed = result.get("failed_variants") or {}
    if failed:
        lines += ["", "Variants that failed (no figures; the other variants' rounds ran as usual):", ""]
    for key, err in failed.items():
        n, name = key.split("/", 1)
        lines += [f"- **{name}** at {n} rank{'s' if n != '1' else ''}: `{_last_error_line(err)}`"]
    table = breakdown.markdown(ranks)
    if table:
        lines += ["", table]
    fig, ax = plt.subplots(figsize=(7, 4))
    xs = range(len(names))
    ax.bar(xs, [ranks["2"][n]["vs_limit"] for n in names],
           yerr=[[ranks["2"][n]["vs_limit"] * (1 - ranks["2"][n]["min"] / ranks["2"][n]["median"]) for n in names],
                 [ranks["2"][n]["vs_limit"] * (ranks["2"][n]["max"] / ranks["2"][n]["median"] - 1) for n in names]],
           color=["gray" if n == "limit" else "tab:blue" for n in names])
    ax.axhline(0.95, color="red", linestyle="--", linewidth=1, label="target for the default: 0.95")
    ax.set_xticks(list(xs), names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("samples/s as a fraction of the limit")
    ax.set_title("2 ranks: throughput / limit (bars: median, whiskers: min..max)")
    ax.legend(fontsize=8)
    core.save_plot(fig, plots / "throughput_vs_limit.png")
    lines += ["", "![throughput vs limit](plots/throughput_vs_limit.png)"]
    return "\n".join(lines)


def _last_error_line(err: str) -> str:
    """The exception's own line from a failed job's output (ranks prefix theirs "[rankN]:")."""
    lines = [line.split("]:", 1)[-1].strip() for line in err.splitlines()]
    errors = [line for line in lines if re.match(r"^[A-Za-z_.]*(Error|Exception)\b", line)]
    return (errors or [line for line in lines if line] or ["?"])[-1][:200]


# --- jobs -----------------------------------------------------------------------------------------------
def _model_and_batch(seed: int = 0):
    import torch

    from hvd_trainer.models import ResNet

    torch.manual_seed(seed)
    model = ResNet(3, CHANNELS, 1, 10)
    g = torch.Generator().manual_seed(seed)
    return model, torch.randn(BATCH, 3, HW, HW, generator=g), torch.randint(0, 10, (BATCH,), generator=g)


def _blocks(step, steps: int, blocks: int, samples: int) -> list[float]:
    """samples/s of ``blocks`` timed blocks of ``steps`` steps, after one warm-up block."""
    return [samples / t for t in core.timed(step, 1, blocks, steps)]


def _sgd(model, world: int):
    import torch

    return torch.optim.SGD(model.parameters(), lr=0.01 * world, momentum=0.9)


def job_limit(steps: int, blocks: int) -> Optional[dict]:
    """Plain torch on every rank, no communication while timed; the sum over ranks. Each rank
    also times its forward+backward (with zero_grad, as the trainer's compute) and its update:
    three clock reads and an append per step, nothing against a step of tens of ms."""
    import time

    import torch
    from mpi4py import MPI

    torch.set_num_threads(1)
    model, x, y = _model_and_batch()
    opt = _sgd(model, 1)
    laps: list[tuple[float, float]] = []

    def step():
        t0 = time.perf_counter()
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        t1 = time.perf_counter()
        opt.step()
        laps.append((t1 - t0, time.perf_counter() - t1))

    cpu0, wall0 = time.process_time(), time.perf_counter()
    mine = _blocks(step, steps, blocks, BATCH)
    cpu_util = (time.process_time() - cpu0) / (time.perf_counter() - wall0)
    timed = laps[steps:]  # the first block is the warm-up
    step_s = statistics.fmean(BATCH / rate for rate in mine)
    compute_s = statistics.fmean(c for c, _ in timed)
    optimizer_s = statistics.fmean(o for _, o in timed)
    my_time = {"data_s": 0.0, "compute_s": compute_s, "exchange_s": 0.0, "optimizer_s": optimizer_s,
               "other_s": step_s - compute_s - optimizer_s, "step_s": step_s, "cpu_util": cpu_util}
    comm = MPI.COMM_WORLD
    everyone = comm.gather((mine, my_time), root=0)
    if comm.rank != 0:
        return None
    rates = [r for r, _ in everyone]
    return {"samples_per_s": [sum(vals) for vals in zip(*rates)], "per_rank": rates,
            "time": {k: statistics.fmean(t[k] for _, t in everyone) for k in my_time}}


def job_hand_horovod(steps: int, blocks: int) -> Optional[dict]:
    import horovod.torch as hvd
    import torch

    hvd.init()
    torch.set_num_threads(1)
    model, x, y = _model_and_batch()
    opt = hvd.DistributedOptimizer(_sgd(model, hvd.size()), named_parameters=model.named_parameters())
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)

    def step():
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    out = _blocks(step, steps, blocks, BATCH * hvd.size())
    return {"samples_per_s": out} if hvd.rank() == 0 else None


def job_hand_ddp(steps: int, blocks: int) -> Optional[dict]:
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    comm = core.init_gloo()
    torch.set_num_threads(1)
    model, x, y = _model_and_batch()
    model = DistributedDataParallel(model)
    opt = _sgd(model, comm.size)

    def step():
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    out = _blocks(step, steps, blocks, BATCH * comm.size)
    del model
    dist.barrier()
    dist.destroy_process_group()
    return {"samples_per_s": out} if comm.rank == 0 else None


def job_hand_ps(steps: int, blocks: int) -> Optional[dict]:
    import numpy as np
    import torch
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    server, workers = comm.size - 1, comm.size - 1
    torch.set_num_threads(1)
    model, x, y = _model_and_batch()
    params = list(model.parameters())
    flat = torch.cat([p.detach().reshape(-1) for p in params])
    if comm.rank == server:
        weights = torch.nn.Parameter(flat.clone())
        opt = torch.optim.SGD([weights], lr=0.01 * workers, momentum=0.9)
        grad = np.empty(flat.numel(), dtype=np.float32)
        for _ in range(steps * (blocks + 1)):
            acc = np.zeros_like(grad)
            for w in range(workers):
                comm.Recv(grad, source=w)
                acc += grad
            weights.grad = torch.from_numpy(acc / workers)
            opt.step()
            for w in range(workers):
                comm.Send(weights.detach().numpy(), dest=w)
        return None
    buf = np.empty(flat.numel(), dtype=np.float32)

    def step():
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        comm.Send(torch.cat([p.grad.reshape(-1) for p in params]).numpy(), dest=server)
        comm.Recv(buf, source=server)
        offset = 0
        with torch.no_grad():
            for p in params:
                p.copy_(torch.from_numpy(buf[offset:offset + p.numel()]).view_as(p))
                offset += p.numel()

    out = _blocks(step, steps, blocks, BATCH * workers)
    return {"samples_per_s": out} if comm.rank == 0 else None


def job_trainer(steps: int, blocks: int, overrides: list[str], run_dir: str) -> Optional[dict]:
    """``hvd-train`` on a fixed batch: one epoch is one block (the first is the warm-up).
    hvd_trainer is imported before torch, as ``hvd-train`` does (its torch defaults)."""
    from hvd_trainer import load_config, train
    from hvd_trainer.runtime.launch_env import launcher_rank
    from torch.utils.data import TensorDataset

    model, x, y = _model_and_batch()
    servers = next((int(o.split("=")[1]) for o in overrides if o.startswith("ps.num_servers=")), 1)
    world = int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1"))
    workers = world - servers if any(o == "strategy=ps" for o in overrides) else world
    cfg = load_config(None, [
        "model.name=resnet", f"model.channels={CHANNELS}", "optim.name=sgd", "optim.lr=0.01",
        "optim.momentum=0.9", f"batch_size={BATCH}", f"epochs={blocks + 1}", "data.shuffle=false",
        "checkpoint.every_epochs=0", "checkpoint.resume=never", "runtime.progress=false",
        "runtime.threads=1", f"run_dir={run_dir}", *overrides])
    data = TensorDataset(x.repeat(steps * workers, 1, 1, 1), y.repeat(steps * workers))
    train(cfg, model=model, train_data=data, test_data=TensorDataset(x[:4], y[:4]))
    return {"samples_per_s": core.epoch_throughputs(run_dir)} if launcher_rank() == 0 else None


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--job", required=True, choices=["limit", "hand-horovod", "hand-ddp", "hand-ps", "trainer"])
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--blocks", type=int, default=2)
    p.add_argument("--override", action="append", default=[])
    p.add_argument("--run-dir", default="")
    a = p.parse_args()
    fn = {"limit": job_limit, "hand-horovod": job_hand_horovod, "hand-ddp": job_hand_ddp, "hand-ps": job_hand_ps}.get(a.job)
    out = fn(a.steps, a.blocks) if fn else job_trainer(a.steps, a.blocks, a.override, a.run_dir)
    if out is not None:
        core.emit(out)


if __name__ == "__main__":
    main()
