"""Training throughput: hvd-train vs a hand-written Horovod loop vs torch DDP, side by side.

    .venv/bin/python benchmarks/throughput.py                # the comparison (README, "Speed")
    .venv/bin/python benchmarks/throughput.py --sweep        # also sweep cycle time and MPI yield

Same CNN (~1.2M parameters), batch 32 per rank, fixed random batch, fp32, no accumulation,
SGD, one thread per rank, 2 ranks under mpirun. Each variant is its own mpirun job (Horovod
reads its knobs at init); rounds alternate the variants so drift on this noisy machine hits
them all alike. Every job runs a warm-up block, then timed blocks; a variant's figure is the
median samples/s over all its timed blocks, with the spread (min..max) beside it.

Variants:
  trainer/stock   hvd-train, stock Horovod/Open MPI settings (HOROVOD_CYCLE_TIME=1, no MPI yield)
  hand/stock      minimal hand-written Horovod loop, stock settings
  trainer/ours    hvd-train with its defaults
  hand/ours       hand-written loop with the trainer's settings (cycle time, MPI yielding)
  ddp             hand-written torch DDP over gloo, torch's defaults
"""
from __future__ import annotations

import argparse
import os
import time

from common import TMP, emit, epoch_throughputs, report, run_job, run_rounds, timed_blocks

BATCH = 32
CHANNELS = [64, 128, 256]  # ResNet stages -> 1.22M parameters on 3x32x32 inputs


# --------------------------------------------------------------------------------------------
# jobs (run on every rank under mpirun)
# --------------------------------------------------------------------------------------------
def _model_and_batch(seed: int = 0):
    import torch
    from hvd_trainer.models import ResNet

    torch.manual_seed(seed)
    model = ResNet(3, CHANNELS, 1, 10)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(BATCH, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (BATCH,), generator=g)
    return model, x, y


def job_hand_horovod(steps: int, blocks: int) -> list[float]:
    import horovod.torch as hvd
    import torch

    hvd.init()
    torch.set_num_threads(1)
    model, x, y = _model_and_batch()
    opt = torch.optim.SGD(model.parameters(), lr=0.01 * hvd.size(), momentum=0.9)
    opt = hvd.DistributedOptimizer(opt, named_parameters=model.named_parameters())
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)

    def step():
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    out = timed_blocks(step, steps, blocks, BATCH * hvd.size())
    return out if hvd.rank() == 0 else []


def job_ddp(steps: int, blocks: int) -> list[float]:
    import torch
    import torch.distributed as dist
    from mpi4py import MPI
    from torch.nn.parallel import DistributedDataParallel

    comm = MPI.COMM_WORLD
    port = comm.bcast(_free_port() if comm.rank == 0 else None, root=0)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=comm.rank, world_size=comm.size)
    torch.set_num_threads(1)
    model, x, y = _model_and_batch()
    model = DistributedDataParallel(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.01 * comm.size, momentum=0.9)

    def step():
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    out = timed_blocks(step, steps, blocks, BATCH * comm.size)
    dist.destroy_process_group()
    return out if comm.rank == 0 else []


def job_trainer(steps: int, blocks: int, run_dir: str) -> list[float]:
    from torch.utils.data import TensorDataset

    from hvd_trainer import load_config, train
    from hvd_trainer.launch_env import launcher_rank

    _, x, y = _model_and_batch()
    world = int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1"))
    # every rank's shard is the fixed batch, `steps` times over: one epoch = one block
    xs, ys = x.repeat(steps * world, 1, 1, 1), y.repeat(steps * world)
    cfg = load_config(None, [
        "strategy=horovod", "model.name=resnet", f"model.channels={CHANNELS}", "optim.name=sgd",
        "optim.lr=0.01", "optim.momentum=0.9", f"batch_size={BATCH}", f"epochs={blocks + 1}",
        "data.shuffle=false", "checkpoint.every_epochs=0", "checkpoint.resume=never",
        "runtime.progress=false", "runtime.threads=1", f"run_dir={run_dir}"])
    train(cfg, train_data=TensorDataset(xs, ys), test_data=TensorDataset(x[:4], y[:4]))
    if launcher_rank() != 0:
        return []
    return epoch_throughputs(run_dir)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------------------------
# driver
# --------------------------------------------------------------------------------------------
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--job", choices=["hand", "ddp", "trainer"])
    p.add_argument("--run-dir", default="")
    p.add_argument("--steps", type=int, default=20, help="steps per timed block")
    p.add_argument("--blocks", type=int, default=2, help="timed blocks per job (after one warm-up block)")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds of all variants")
    p.add_argument("--np", type=int, default=2)
    p.add_argument("--sweep", action="store_true", help="also sweep HOROVOD_CYCLE_TIME and MPI yielding")
    p.add_argument("--json", help="write the figures to this file")
    args = p.parse_args()

    if args.job:
        fn = {"hand": job_hand_horovod, "ddp": job_ddp}.get(args.job)
        emit(fn(args.steps, args.blocks) if fn else job_trainer(args.steps, args.blocks, args.run_dir))
        return

    from hvd_trainer.launch_env import MPI_RUNTIME_DEFAULTS
    from hvd_trainer.strategies.horovod import DEFAULT_CYCLE_TIME_MS

    one = {"OMP_NUM_THREADS": "1"}
    # Horovod 0.28.1's and Open MPI's built-in defaults, made explicit (the trainer's own
    # defaults only apply where the environment says nothing)
    stock = {"HOROVOD_CYCLE_TIME": "1", "OMPI_MCA_mpi_yield_when_idle": "0", **one}
    ours = {"HOROVOD_CYCLE_TIME": f"{DEFAULT_CYCLE_TIME_MS:g}", **MPI_RUNTIME_DEFAULTS, **one}
    variants = {
        "trainer/stock": ("trainer", stock),
        "hand/stock": ("hand", stock),
        "trainer/ours": ("trainer", ours),
        "hand/ours": ("hand", ours),
        "ddp": ("ddp", one),
    }
    if args.sweep:
        for ct in ("1", "2", "10", "20"):
            variants[f"hand/cycle={ct}ms"] = ("hand", {"HOROVOD_CYCLE_TIME": ct, **one})
            variants[f"hand/cycle={ct}ms+yield"] = ("hand", {"HOROVOD_CYCLE_TIME": ct, **MPI_RUNTIME_DEFAULTS, **one})

    def run(name, spec):
        kind, env = spec
        job = ["--job", kind, "--steps", str(args.steps), "--blocks", str(args.blocks),
               "--run-dir", str(TMP / f"{kind}-{time.monotonic_ns()}")]
        return run_job(__file__, job, args.np, env)

    results = run_rounds(variants, args.rounds, run)
    report(f"training throughput, np={args.np}, CNN {CHANNELS} (1.22M params), batch {BATCH}/rank, "
           f"{args.rounds} rounds x {args.blocks} blocks x {args.steps} steps",
           results,
           {"trainer/stock vs hand/stock": ("trainer/stock", "hand/stock"),
            "trainer/ours vs hand/ours": ("trainer/ours", "hand/ours"),
            "hand/stock vs ddp": ("hand/stock", "ddp"),
            "hand/ours vs ddp": ("hand/ours", "ddp"),
            "trainer/ours (defaults) vs ddp": ("trainer/ours", "ddp")},
           {"trainer/stock vs hand/stock": 0.97, "trainer/ours vs hand/ours": 0.97,
            "trainer/ours (defaults) vs ddp": 1.0}, args.json)


if __name__ == "__main__":
    main()
