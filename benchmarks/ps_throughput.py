"""Parameter-server step throughput: hvd-train's PS against the simplest mpi4py PS, and backup
workers under a straggler.

    .venv/bin/python benchmarks/ps_throughput.py

Part 1 (np=3: 1 server, 2 workers, sync SGD, same model, batch and ranks):
  naive     workers send the whole flat gradient with blocking Send, the server Recv's each in
            turn, averages, steps, Send's the parameters back (blocking, busy-polling MPI)
  ours      hvd-train strategy=ps ps.mode=sync (shards, non-blocking buffer calls, polling waits)
  target: ours >= 1.0x naive.
Part 2 (np=4: 1 server, 3 workers, worker 1 delayed by --straggler-ms per step):
  sync            no straggler
  sync+straggler  every step waits for the straggler
  backup+straggler backup_workers=1: steps proceed with the first 2 of 3 gradients
  reported: each straggler variant's throughput as a ratio of the no-straggler run.

Model: an MLP 3072-384-256-10 (1.28M parameters) on fixed random 3x32x32 inputs, batch 32 per
worker, one thread per rank: a communication-heavy step, where the exchange design shows.
"""
from __future__ import annotations

import argparse
import time

from common import TMP, emit, epoch_throughputs, report, run_job, run_rounds, timed_blocks

BATCH = 32
HIDDEN = [384, 256]
SHAPE = (3, 32, 32)


def _model_and_batch():
    import torch
    from hvd_trainer.models import MLP

    torch.manual_seed(0)
    model = MLP(3 * 32 * 32, HIDDEN, 10)
    g = torch.Generator().manual_seed(0)
    return model, torch.randn(BATCH, *SHAPE, generator=g), torch.randint(0, 10, (BATCH,), generator=g)


def job_naive(steps: int, blocks: int) -> list[float]:
    """The simplest correct mpi4py PS: last rank serves, blocking calls, whole flat vectors."""
    import numpy as np
    import torch
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    server, workers = size - 1, size - 1
    torch.set_num_threads(1)
    model, x, y = _model_and_batch()
    params = list(model.parameters())
    flat = torch.cat([p.detach().reshape(-1) for p in params])
    total_steps = steps * (blocks + 1)
    if rank == server:
        weights = torch.nn.Parameter(flat.clone())
        opt = torch.optim.SGD([weights], lr=0.01 * workers, momentum=0.9)
        grad = np.empty(flat.numel(), dtype=np.float32)
        for _ in range(total_steps):
            acc = np.zeros_like(grad)
            for w in range(workers):
                comm.Recv(grad, source=w)
                acc += grad
            weights.grad = torch.from_numpy(acc / workers)
            opt.step()
            out = weights.detach().numpy()
            for w in range(workers):
                comm.Send(out, dest=w)
        return []
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

    out = timed_blocks(step, steps, blocks, BATCH * workers)
    return out if rank == 0 else []


def job_trainer(steps: int, blocks: int, run_dir: str, overrides: list[str]) -> list[float]:
    from torch.utils.data import TensorDataset

    from hvd_trainer import load_config, train
    from hvd_trainer.launch_env import launcher_rank

    model, x, y = _model_and_batch()
    cfg = load_config(None, [
        "strategy=ps", "model.name=mlp", f"model.hidden={HIDDEN}", "optim.name=sgd", "optim.lr=0.01",
        "optim.momentum=0.9", f"batch_size={BATCH}", f"epochs={blocks + 1}", "data.shuffle=false",
        "checkpoint.every_epochs=0", "checkpoint.resume=never", "runtime.progress=false",
        "runtime.threads=1", f"run_dir={run_dir}", *overrides])
    from mpi4py import MPI
    workers = MPI.COMM_WORLD.Get_size() - cfg.ps.num_servers
    data = TensorDataset(x.repeat(steps * workers, 1, 1, 1), y.repeat(steps * workers))
    train(cfg, model=model, train_data=data, test_data=TensorDataset(x[:4], y[:4]))
    if launcher_rank() != 0:
        return []
    return epoch_throughputs(run_dir)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--job", choices=["naive", "trainer"])
    p.add_argument("--run-dir", default="")
    p.add_argument("--override", action="append", default=[])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--blocks", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--straggler-ms", type=float, default=30.0)
    p.add_argument("--json")
    args = p.parse_args()
    if args.job == "naive":
        emit(job_naive(args.steps, args.blocks))
        return
    if args.job == "trainer":
        emit(job_trainer(args.steps, args.blocks, args.run_dir, args.override))
        return

    def run(name, spec):
        kind, np, overrides = spec
        job = ["--job", kind, "--steps", str(args.steps), "--blocks", str(args.blocks),
               "--run-dir", str(TMP / f"ps-{time.monotonic_ns()}")]
        for o in overrides:
            job += ["--override", o]
        return run_job(__file__, job, np, {"OMP_NUM_THREADS": "1"})

    slow = ["ps.straggler_rank=1", f"ps.straggler_ms={args.straggler_ms:g}"]
    variants = {
        "naive (np=3)": ("naive", 3, []),
        "ours sync (np=3)": ("trainer", 3, []),
        "sync (np=4)": ("trainer", 4, []),
        "sync+straggler (np=4)": ("trainer", 4, slow),
        "backup+straggler (np=4)": ("trainer", 4, slow + ["ps.backup_workers=1"]),
    }
    results = run_rounds(variants, args.rounds, run)
    report(f"parameter server, MLP {HIDDEN} (1.28M params), batch {BATCH}/worker, straggler "
           f"{args.straggler_ms:g} ms/step, {args.rounds} rounds x {args.blocks} blocks x {args.steps} steps",
           results,
           {"ours vs naive (np=3)": ("ours sync (np=3)", "naive (np=3)"),
            "sync+straggler vs sync": ("sync+straggler (np=4)", "sync (np=4)"),
            "backup+straggler vs sync": ("backup+straggler (np=4)", "sync (np=4)")},
           {"ours vs naive (np=3)": 1.0}, args.json)


if __name__ == "__main__":
    main()
