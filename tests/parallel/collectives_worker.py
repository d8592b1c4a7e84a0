"""Run every small collective of one strategy against closed forms; write the verdicts.

    mpirun -np N python tests/parallel/collectives_worker.py OUT_DIR strategy=NAME [KEY=VALUE ...]

Each training rank writes ``OUT_DIR/rank<R>.json``: check name -> "ok" or what went wrong. A
parameter-server rank has no collectives of its own: it waits for a start that never comes and
leaves when the workers shut down, as it does when they stop on a config error.
"""
import json
import sys
import traceback
from pathlib import Path

import numpy as np
import torch
from torch import nn

from hvd_trainer import load_config
from hvd_trainer.config import ConfigError
from hvd_trainer.runtime.launch_env import apply_mpi_defaults
from hvd_trainer.strategies import make_strategy
from hvd_trainer.strategies.base import StepPlan, unwrap

out_dir = Path(sys.argv[1])
cfg = load_config(None, sys.argv[2:])
apply_mpi_defaults()
s = make_strategy(cfg)
s.init()
type(s).check(cfg, s.size)
duty = s.role()
if duty is not None:
    try:
        duty()
    except ConfigError as err:
        assert "stopped before training" in str(err), err
    s.shutdown()
    sys.exit(0)

n, r = s.dp_size, s.dp_rank
results = {}


def check(name, fn):
    print(f"rank {r}: checking {name}", flush=True)  # a hang shows where, in the timeout report
    try:
        fn()
        results[name] = "ok"
    except Exception as err:  # noqa: BLE001 - record, and go on with the other checks
        results[name] = f"{type(err).__name__}: {err}\n{traceback.format_exc(limit=3)}"


def allreduce_sum(dtype):
    def run():
        g = torch.Generator().manual_seed(7)  # the same x on every rank
        x = torch.randint(-100, 100, (1000,), generator=g).to(dtype)  # integers: sums are exact
        before = x.clone()
        got = s.allreduce(x, op="sum")
        assert torch.equal(x, before), "allreduce changed its input"
        assert got.dtype == dtype, got.dtype
        assert torch.equal(got, x * n), f"max error {(got - x * n).abs().max()}"
        ranked = s.allreduce(torch.full((3,), float(r + 1), dtype=dtype), op="sum")
        assert torch.equal(ranked, torch.full((3,), n * (n + 1) / 2, dtype=dtype)), ranked
    return run


def allreduce_average():
    got = s.allreduce(torch.full((4,), float(r + 1), dtype=torch.float64), op="average")
    torch.testing.assert_close(got, torch.full((4,), (n + 1) / 2, dtype=torch.float64), rtol=0, atol=1e-12)


def broadcast_object(payload_for_root, root):
    def run():
        expected = payload_for_root()
        got = s.broadcast_object(expected if r == root else None, root_rank=root)
        assert type(got) is type(expected) and got == expected, f"got {type(got).__name__} of {len(got)}"
    return run


def several_mb():
    return np.random.default_rng(3).integers(0, 256, 5 * 2**20 + 17, dtype=np.uint8).tobytes()


def allgather_order():
    got = s.allgather_object({"rank": r, "pad": "x" * (r * 1000)})  # sizes differ by rank
    assert [g["rank"] for g in got] == list(range(n)), [g["rank"] for g in got]
    assert [len(g["pad"]) for g in got] == [i * 1000 for i in range(n)]


def parameters_and_buffers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model, opt = s.prepare(model, opt, StepPlan(1, 1, 1))
    module = unwrap(model)
    with torch.no_grad():
        for p in module.parameters():
            p.fill_(float(r))
        module[1].running_mean.fill_(float(r) + 0.5)
    s.broadcast_buffers(model)
    assert torch.equal(module[1].running_mean, torch.full((4,), 0.5)), module[1].running_mean
    s.broadcast_parameters(model)
    assert all(torch.equal(p, torch.zeros_like(p)) for p in module.parameters()), "not rank 0's parameters"


check("allreduce_sum_float64", allreduce_sum(torch.float64))
check("allreduce_sum_float32", allreduce_sum(torch.float32))
check("allreduce_average", allreduce_average)
check("broadcast_object_empty", broadcast_object(lambda: b"", 0))
check("broadcast_object_small", broadcast_object(lambda: {"step": 3, "path": "ckpt-3.pt"}, 0))
check("broadcast_object_several_mb", broadcast_object(several_mb, 0))
check("broadcast_object_from_last_rank", broadcast_object(lambda: [n - 1, "last"], n - 1))
check("allgather_object_order", allgather_order)
check("broadcast_parameters_and_buffers", parameters_and_buffers)
out_dir.mkdir(parents=True, exist_ok=True)
(out_dir / f"rank{s.rank}.json").write_text(json.dumps(results))
s.shutdown()
