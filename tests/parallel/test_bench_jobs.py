"""hvd-bench's measuring jobs under real mpirun: every exchange path runs and reports every size,
and the patched Horovod build's wake-on-enqueue is in effect (the trainer's gradient path)."""
from __future__ import annotations

import json
import sys

import pytest

from conftest import mpirun

MARK = "BENCH_RESULT "


def bench_job(np: int, job: str, sizes: str, env: dict, max_iters: int = 3, timeout: float = 120) -> dict:
    res = mpirun(np, [sys.executable, "-m", "benchmarks.collectives", "--job", job, "--sizes", sizes,
                      "--warmup", "1", "--repeats", "2", "--max-iters", str(max_iters)],
                 timeout=timeout, env={"OMP_NUM_THREADS": "1", **env})
    lines = [line for line in res.stdout.splitlines() if line.startswith(MARK)]
    assert len(lines) == 1, res.output[-3000:]  # rank 0 alone reports
    return json.loads(lines[0][len(MARK):])


@pytest.mark.parametrize("job,np", [("mpi", 2), ("horovod-trainer", 3), ("torch-gloo", 2), ("ps", 3)])
def test_every_exchange_path_reports_every_size(job, np):
    out = bench_job(np, job, "4,65536,1048576", {})
    assert set(out["times"]) == {"4", "65536", "1048576"}
    assert all(len(t) == 2 and all(x > 0 for x in t) for t in out["times"].values())
    # and the timed op really exchanges: one op on rank + 1 from every rank, in closed form
    if job == "ps":  # np - 1 workers push to a fresh zero shard; its first SGD step pulls back -lr * mean
        from hvd_trainer.config import OptimConfig

        workers = np - 1
        expected = -OptimConfig().lr * (workers + 1) / 2
    else:  # a sum over the ranks
        expected = np * (np + 1) / 2
    assert set(out["check"]) == set(out["times"])
    for size, (low, high) in out["check"].items():
        assert low == pytest.approx(expected, rel=1e-6) and high == pytest.approx(expected, rel=1e-6), \
            (size, low, high, expected)


def test_waiting_for_an_allreduce_wakes_horovods_cycle():
    """With a 50 ms cycle, back-to-back allreduces of 4 bytes each wait out most of a cycle in
    stock Horovod; with the patch (HOROVOD_WAKE_ON_WAIT=1, the trainer's default) waiting for
    the result starts the cycle at once. 25 ms splits the two by a wide margin on any machine: the op
    itself takes microseconds, a cycle's wait tens of milliseconds."""
    slow = {"HOROVOD_CYCLE_TIME": "50", "HOROVOD_WAKE_ON_WAIT": "0"}
    fast = {"HOROVOD_CYCLE_TIME": "50", "HOROVOD_WAKE_ON_WAIT": "1"}
    stock = min(bench_job(2, "horovod-stock", "4", slow)["times"]["4"])
    woken = max(bench_job(2, "horovod-stock", "4", fast)["times"]["4"])
    assert stock > 0.025, f"stock Horovod did not wait for its cycle ({stock * 1e3:.1f} ms/op)"
    assert woken < 0.025, (f"waiting did not wake Horovod's cycle ({woken * 1e3:.1f} ms/op): is the "
                           "patched build of scripts/install.sh installed?")


SKEWED = """
import sys, time
import horovod.torch as hvd
import torch
hvd.init()
t = torch.ones(4)
hvd.allreduce(t, name="warm")
times = []
for i in range(5):
    if hvd.rank() == 1:
        time.sleep(0.005)  # rank 1 enqueues later: rank 0's woken cycle finds it not ready
    t0 = time.perf_counter()
    hvd.allreduce(t, name=f"op{i}")
    times.append(time.perf_counter() - t0)
if hvd.rank() == 0:
    print("MAX_OP_S", max(times))
"""


def test_a_waited_request_is_not_left_for_a_whole_cycle_when_a_peer_is_late():
    """Rank 0 waits first and wakes its cycle; rank 1's request is not there yet, so that cycle
    negotiates nothing. With a 1 s cycle the retry must come while rank 0 still waits (the
    patch's short cycle while someone waits), not a second later. Each op waits ~5 ms for rank
    1; 0.5 s is a bound no machine comes near unless the retry waits for the cycle."""
    res = mpirun(2, [sys.executable, "-c", SKEWED], timeout=120,
                 env={"HOROVOD_CYCLE_TIME": "1000", "HOROVOD_WAKE_ON_WAIT": "1", "OMP_NUM_THREADS": "1"})
    worst = float(next(line.split()[1] for line in res.stdout.splitlines() if line.startswith("MAX_OP_S")))
    assert worst < 0.5, f"an allreduce took {worst:.3f} s: the retry waited for the 1 s cycle"
