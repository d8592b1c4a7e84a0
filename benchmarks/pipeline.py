"""Input pipeline: PNG decode + augmentation through loader workers vs pre-decoded tensors.

    .venv/bin/python benchmarks/pipeline.py                 # np 1 and 2 (benchmarks/README.md)

The same model (ResNet [32, 64, 128], batch 32 per rank, SGD, Horovod, one torch thread per
rank) trains on the same images three ways, each its own mpirun job, rounds alternating:

  memory        the images decoded once, beforehand: an in-memory TensorDataset (fast path)
  png/workers=W the PNG folder: every sample decoded (Pillow), resized 64x64 -> 32x32 and
                augmented (random padded crop + flip) by W loader worker processes per rank
  png/workers=0 the same work on the training thread

A variant's figure is the median, with its min..max, of the per-epoch samples/s of all its
jobs, each job's first epoch a warm-up (evaluation excluded); ratios compare medians of one
run. Ranks are not bound to cores (``--bind-to none``): a rank bound to a core would hold its
workers on that core too. With one torch thread per rank, at np=1 one core trains and the
other is free for the workers; at np=2 both cores train and the workers get only what the
ranks leave idle (waits in the allreduce).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

if not __package__:  # run as a file, not with -m: make the repository's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import core  # noqa: E402

BATCH = 32
CHANNELS = [32, 64, 128]
SIDE, STORED = 32, 64  # training resolution; the PNGs are stored larger and resized on decode
DATA = Path(tempfile.gettempdir()) / "hvd-bench" / "pipeline-data"  # made once, reused by later runs


def make_data(root: Path, n_train: int, n_test: int, seed: int = 0) -> None:
    """Class-dependent smooth patterns plus noise, as 64x64 RGB PNGs (once; reused)."""
    import numpy as np

    from hvd_trainer.data.datasets import write_image_folder

    if (root / "done").exists():
        return
    rng = np.random.default_rng(seed)
    classes = 10
    protos = rng.random((classes, 3, 8, 8))
    for name, n in (("train", n_train), ("test", n_test)):
        y = rng.integers(0, classes, n)
        low = np.kron(protos[y], np.ones((1, 1, STORED // 8, STORED // 8)))
        x = np.clip(0.7 * low + 0.3 * rng.random((n, 3, STORED, STORED)), 0, 1)
        write_image_folder(str(root / name), x, y)
    (root / "done").write_text("ok\n")


# --------------------------------------------------------------------------------------------
# job (every rank, under mpirun)
# --------------------------------------------------------------------------------------------
def job(kind: str, workers: int, data: str, epochs: int, run_dir: str) -> Optional[list[float]]:
    """One training run; rank 0 returns its per-epoch samples/s, the others None."""
    import torch
    from torch.utils.data import TensorDataset

    from hvd_trainer import load_config, train
    from hvd_trainer.data.datasets import CropFlip, ImageFolder
    from hvd_trainer.runtime.launch_env import launcher_rank

    cfg = load_config(None, [
        "strategy=horovod", "model.name=resnet", f"model.channels={CHANNELS}", "optim.name=sgd",
        "optim.lr=0.01", "optim.momentum=0.9", f"batch_size={BATCH}", f"epochs={epochs}",
        f"data.num_workers={workers}", "checkpoint.every_epochs=0", "checkpoint.resume=never",
        "runtime.progress=false", "runtime.threads=1", f"run_dir={run_dir}"])
    train_set = ImageFolder(f"{data}/train", CropFlip(), size=[SIDE, SIDE])
    test_set = ImageFolder(f"{data}/test", size=[SIDE, SIDE])
    if kind == "memory":  # decoded once, before training: the fast path
        def decoded(ds):
            xs, ys = zip(*(ds[i] for i in range(len(ds))))
            return TensorDataset(torch.stack(xs), torch.tensor(ys))

        train_set.transform = None
        train_set, test_set = decoded(train_set), decoded(test_set)
    train(cfg, train_data=train_set, test_data=test_set)
    return core.epoch_throughputs(run_dir) if launcher_rank() == 0 else None


# --------------------------------------------------------------------------------------------
# driver
# --------------------------------------------------------------------------------------------
def report(title: str, results: dict[str, list[float]], ratios: dict[str, tuple[str, str]],
           targets: dict[str, float], json_path: Optional[str] = None) -> dict[str, float]:
    """Print each variant's median samples/s with its min..max, then the ratios of medians
    (``label -> (a, b)``: a / b) against their targets; optionally write it all as JSON."""
    stats = {name: core.summary(vals) for name, vals in results.items()}
    print(f"\n{title}\n(median samples/s over the timed epochs, min..max)")
    for name, q in stats.items():
        print(f"  {name:<26} {q['median']:9.1f}   ({q['min']:.1f} .. {q['max']:.1f})")
    print("ratios of medians (same run)")
    out = {}
    for label, (a, b) in ratios.items():
        out[label] = value = stats[a]["median"] / stats[b]["median"]
        t = targets.get(label)
        verdict = "" if t is None else f"   target >= {t:.2f}: {'met' if value >= t else 'NOT met'}"
        print(f"  {label:<40} {value:6.3f}{verdict}")
    if json_path:
        Path(json_path).write_text(json.dumps({"summary": stats, "ratios": out, "targets": targets,
                                               "time": time.strftime("%Y-%m-%d %H:%M")}, indent=2))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--job", choices=["memory", "png"])
    p.add_argument("--workers", type=int, default=2, help="loader workers per rank")
    p.add_argument("--data", default=str(DATA))
    p.add_argument("--run-dir", default="")
    p.add_argument("--samples", type=int, default=1536, help="training images")
    p.add_argument("--epochs", type=int, default=3, help="per job; the first is a warm-up")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--np", type=int, nargs="+", default=[1, 2])
    p.add_argument("--json", help="write the figures to this file")
    args = p.parse_args()

    if args.job:
        out = job(args.job, args.workers, args.data, args.epochs, args.run_dir)
        if out is not None:
            core.emit(out)
        return

    make_data(Path(args.data), args.samples, 128)
    variants = {}
    for np_ in args.np:
        variants[f"np{np_} memory"] = (np_, "memory", 0)
        variants[f"np{np_} png/workers={args.workers}"] = (np_, "png", args.workers)
        variants[f"np{np_} png/workers=0"] = (np_, "png", 0)

    bench = core.Bench(mode=core.QUICK, out=Path(args.data))  # for its jobs and scratch dirs: mode, out unused
    results: dict[str, list[float]] = {name: [] for name in variants}
    try:
        for r in range(args.rounds):  # rounds alternate the variants, so drift hits them all alike
            for name, (np_, kind, workers) in variants.items():
                job_args = [kind, "--workers", str(workers), "--data", args.data, "--epochs", str(args.epochs),
                            "--run-dir", bench.scratch()]
                results[name] += bench.job("pipeline", job_args, np_, bind_to="none", desc=name)
                bench.log(f"round {r + 1}/{args.rounds} {name:<24} {core.summary(results[name])['median']:9.1f}")
    finally:
        bench.close()
    ratios, targets = {}, {}
    for np_ in args.np:
        w = f"np{np_} png/workers={args.workers} vs memory"
        ratios[w] = (f"np{np_} png/workers={args.workers}", f"np{np_} memory")
        ratios[f"np{np_} png/workers=0 vs memory"] = (f"np{np_} png/workers=0", f"np{np_} memory")
        targets[w] = 0.9
    report(f"input pipeline, ResNet {CHANNELS}, batch {BATCH}/rank, {args.samples} PNGs {STORED}x{STORED} -> "
           f"{SIDE}x{SIDE} + crop/flip, 1 torch thread/rank, {os.cpu_count()} cores, "
           f"{args.rounds} rounds x {args.epochs - 1} epochs", results, ratios, targets, args.json)


if __name__ == "__main__":
    main()
