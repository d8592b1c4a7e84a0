"""Activation recomputation (``model.recompute``): peak memory and step time, both settings.

    .venv/bin/python benchmarks/recompute_memory.py         # benchmarks/README.md

Each setting runs in a fresh process (so one setting's peak cannot hide the other's): the
built-in ResNet, one training step to warm up, then timed steps. Reported per setting:

- saved for backward: bytes autograd keeps between forward and backward (activations, without
  the weights), summed over distinct storages: the memory recomputation trades;
- peak RSS growth: the process's peak resident memory over the steps, minus its size once the
  model and the batch exist (so: activations, gradients, optimizer state, workspace); on a GPU
  ``torch.cuda.max_memory_allocated`` instead (not exercised here);
- step time.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

CHANNELS, BLOCKS, BATCH, SIDE = [64, 128, 256], 2, 64, 32


def measure(recompute: bool, steps: int) -> dict:
    import torch

    from hvd_trainer.models import ResNet

    torch.manual_seed(0)
    torch.set_num_threads(1)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = ResNet(3, CHANNELS, BLOCKS, 10, recompute).to(dev)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = torch.randn(BATCH, 3, SIDE, SIDE, device=dev), torch.randint(0, 10, (BATCH,), device=dev)

    def step():
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # model and data only
    if dev.type == "cuda":  # not exercised here (no GPU)
        torch.cuda.reset_peak_memory_stats()
    step()  # warm-up: optimizer state, allocator
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in weights:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x).sum()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    seconds = (time.perf_counter() - t0) / steps
    peak = (torch.cuda.max_memory_allocated() if dev.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss_before)
    return {"recompute": recompute, "saved_mb": sum(saved.values()) / 2**20, "peak_growth_mb": peak / 2**20,
            "step_ms": seconds * 1e3, "device": dev.type}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--one", choices=["on", "off"], help="(internal) measure one setting in this process")
    p.add_argument("--steps", type=int, default=5)
    args = p.parse_args()
    if args.one:
        print(json.dumps(measure(args.one == "on", args.steps)))
        return
    rows = []
    for setting in ("off", "on"):
        out = subprocess.run([sys.executable, __file__, "--one", setting, "--steps", str(args.steps)],
                             capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"activation recomputation, ResNet {CHANNELS} x {BLOCKS} blocks, batch {BATCH} of 3x{SIDE}x{SIDE}, "
          f"1 thread, {rows[0]['device']}, {args.steps} steps")
    print(f"  {'model.recompute':<16} {'saved for backward':>20} {'peak RSS growth':>16} {'step':>10}")
    for r in rows:
        print(f"  {str(r['recompute']).lower():<16} {r['saved_mb']:>17.1f} MB {r['peak_growth_mb']:>13.1f} MB "
              f"{r['step_ms']:>7.0f} ms")
    off, on = rows
    print(f"  recompute/plain: saved {on['saved_mb'] / off['saved_mb']:.2f}x, "
          f"peak growth {on['peak_growth_mb'] / max(1e-9, off['peak_growth_mb']):.2f}x, "
          f"step time {on['step_ms'] / off['step_ms']:.2f}x")


if __name__ == "__main__":
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
    main()
