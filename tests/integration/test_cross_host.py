"""Training across testbed hosts, one rank per host, equals the same ranks on one host.

``mpirun`` (Horovod's MPI controller, DDP over gloo, the mpi4py parameter server with its server
on a host of its own) and ``horovodrun --gloo`` (Horovod; DDP and the parameter server need MPI
to find their peers), on 2 and 3 hosts. Each run is compared with the same ranks and config on a
single host under ``mpirun``, trained once for the module; the Gloo runs too (below).

Why bit-identical is expected: the arithmetic is the same on both sides. Each rank computes its
gradient alone (one torch thread everywhere: ``runtime.threads=1``, otherwise a lone rank on a
"host" would take every core and another matmul blocking), and the reductions do not depend on
the transport: Open MPI's tuned allreduce picks its algorithm from the message size and rank
count only (this MLP's 2,410 gradients are 9.6 KB, under the 10 KB where it uses recursive
doubling: a fixed order per element, however Horovod fuses tensors), DDP's buckets are fixed,
and the parameter server sums in ascending rank order. So a cross-host run that differs in any
bit has lost, reordered or duplicated a contribution.

One exception, measured: Horovod over Gloo at 3 ranks (4.5e-8 after 40 steps against Gloo on one
host, 6e-8 against MPI). Gloo's ring starts each chunk's sum at a different rank, and which chunk
an element falls in depends on its offset in Horovod's fusion buffer, which depends on the order
the gradients became ready in that cycle (timing, not the host). With 3 summands the order
changes the rounding; with 2 it cannot (a + b == b + a exactly), so at 2 ranks Gloo across hosts
equals MPI on one host bit for bit. Gloo at 3 ranks is compared within conftest's EQUIV tolerance.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from conftest import EQUIV_STEPS, WORKER, assert_same, run_cmd, summary, train_params
from hosts import SKIP_REASON, run_on, testbed  # noqa: F401 - the fixture

pytestmark = pytest.mark.skipif(SKIP_REASON is not None, reason=f"hosts testbed: {SKIP_REASON}")

CFG = ["data.name=digits", "model.name=mlp", "model.hidden=[32]", "optim.name=sgd", "optim.lr=0.05",
       "optim.momentum=0.9", "optim.lr_scaling=none", "batch_size=16", "epochs=2", "runtime.threads=1",
       f"max_steps={EQUIV_STEPS}", "checkpoint.every_epochs=0", "checkpoint.resume=never",
       "runtime.progress=false"]
STRATEGY = {"horovod": ["strategy=horovod"], "ddp": ["strategy=ddp"],
            "ps": ["strategy=ps", "ps.num_servers=1"],  # the last rank serves: the last host
            # every stage on a host of its own: each activation and its gradient cross a link
            "pipeline": ["strategy=horovod", "model.hidden=[32,16]", "parallel.pipeline_stages=3",
                         "parallel.microbatches=4"]}


def _params(run_dir: Path, np: int) -> list[dict[str, torch.Tensor]]:
    return [torch.load(run_dir / f"params_rank{r}.pt", weights_only=True) for r in range(np)
            if (run_dir / f"params_rank{r}.pt").exists()]


@pytest.fixture(scope="module")
def one_host(tmp_path_factory):
    """The reference: ``hosts`` ranks of ``strategy`` under mpirun on this host, trained once."""
    runs: dict[tuple[str, int], list[dict[str, torch.Tensor]]] = {}

    def get(strategy: str, hosts: int) -> list[dict[str, torch.Tensor]]:
        if (strategy, hosts) not in runs:
            run_dir = tmp_path_factory.mktemp(f"single-{strategy}-{hosts}")
            runs[strategy, hosts] = train_params(hosts, run_dir, [*CFG, *STRATEGY[strategy]])
        return runs[strategy, hosts]
    return get


def _assert_equal_runs(cross: list[dict], single: list[dict], workers: int, exact: bool = True) -> None:
    assert len(cross) == len(single) == workers  # every training rank's weights, on both sides
    for a, b in zip(cross, single):
        assert_same(a, b, exact=exact)


@pytest.mark.parametrize("hosts", [2, 3])
@pytest.mark.parametrize("strategy", ["horovod", "ddp", "ps"])
def test_mpirun_across_hosts_equals_one_host(testbed, one_host, tmp_path, hosts, strategy):
    program = [sys.executable, WORKER, *CFG, *STRATEGY[strategy]]
    cross_dir = tmp_path / "cross"
    res = run_on(testbed, testbed.hosts[0], testbed.mpirun_command([*program, f"run_dir={cross_dir}"], hosts=hosts))
    assert res.returncode == 0, res.output + testbed.logs()
    s = summary(cross_dir)
    assert s["world_size"] == hosts and s["steps"] == EQUIV_STEPS
    _assert_equal_runs(_params(cross_dir, hosts), one_host(strategy, hosts), hosts - 1 if strategy == "ps" else hosts)


def test_pipeline_stages_across_hosts_equal_one_host(testbed, one_host, tmp_path):
    test_mpirun_across_hosts_equals_one_host(testbed, one_host, tmp_path, 3, "pipeline")


@pytest.mark.parametrize("hosts", [2, 3])
def test_horovodrun_gloo_across_hosts_equals_one_host(testbed, one_host, tmp_path, hosts):
    program = [sys.executable, WORKER, *CFG, "strategy=horovod"]
    cmd = testbed.horovodrun_command([*program, f"run_dir={tmp_path / 'cross'}"], hosts=hosts)
    res = run_on(testbed, testbed.hosts[0], cmd)
    assert res.returncode == 0, res.output + testbed.logs()
    assert summary(tmp_path / "cross")["settings"]["controller"] == "gloo"
    cross = _params(tmp_path / "cross", hosts)
    for replica in cross[1:]:
        assert_same(cross[0], replica, exact=True)  # every rank applied the same average
    # 3 summands: the ring's order follows the fusion buffer's timing-dependent layout (above)
    _assert_equal_runs(cross, one_host("horovod", hosts), hosts, exact=hosts == 2)


def test_hvd_launch_testbed_rehearses_a_multi_node_run(tmp_path):
    # the user feature: a testbed of its own, one rank per host, torn down after. Each rank
    # says where it runs, then becomes hvd-train (exec: the same process, the same rank).
    where = ["sh", "-c", 'echo "rank $OMPI_COMM_WORLD_RANK runs on $(hostname)"; exec "$@"', "sh"]
    res = run_cmd(["hvd-launch", "--testbed", "2", "--", *where, "hvd-train", "digits", "epochs=1",
                   "runtime.progress=false", f"run_dir={tmp_path}"], timeout=240)
    assert res.returncode == 0, res.output
    assert "-H node1:1,node2:1" in res.stderr and "btl_tcp_if_include" in res.stderr
    ran = sorted(line for line in res.stdout.splitlines() if line.startswith("rank ") and " runs on " in line)
    assert ran == ["rank 0 runs on node1", "rank 1 runs on node2"], res.output[-3000:]
    s = summary(tmp_path)
    assert s["world_size"] == 2 and s["final_test_accuracy"] > 0.5


def test_the_exchange_wait_grows_on_a_capped_link(testbed, tmp_path):
    """The time breakdown sees the network: the same 2-host run with both hosts' links capped
    waits longer in the gradient exchange, and its compute stays where it was."""
    program = [sys.executable, WORKER, *CFG, "strategy=horovod", "model.hidden=[256]"]  # 76 KB of gradients
    parts = {}
    try:
        for cap in (None, 8.0):
            for host in testbed.hosts[:2]:
                testbed.limit_bandwidth(host, cap)
            run = tmp_path / f"cap-{cap}"
            res = run_on(testbed, testbed.hosts[0], testbed.mpirun_command([*program, f"run_dir={run}"], hosts=2))
            assert res.returncode == 0, res.output + testbed.logs()
            parts[cap] = summary(run)["time_breakdown"]
    finally:
        for host in testbed.hosts[:2]:
            testbed.limit_bandwidth(host, None)
    free, capped = parts[None], parts[8.0]
    # 2 x 76 KB per step at 8 Mbit/s is ~75 ms once tc's 64 KB burst is spent; loopback-fast uncapped
    assert capped["exchange_s"] > max(5 * free["exchange_s"], 0.010), (free, capped)
    assert capped["compute_s"] < capped["exchange_s"]
