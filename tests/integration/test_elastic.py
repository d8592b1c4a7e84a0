"""Horovod elastic on the hosts testbed: a worker's host is lost mid-training and the other goes on
from the last commit with fewer ranks; a host added later joins; the model still learns, and the
summary lists every change.

Elastic needs several hosts: Horovod blacklists the host where a worker failed, so with every
slot on one host nothing would be left (ENVIRONMENT.md)."""
from __future__ import annotations

import json
import os
import sys
from typing import Optional

import psutil
import pytest

from conftest import WORKER
from hosts import SKIP_REASON, testbed  # noqa: F401 - the fixture
from mpi_jobs import netns
from running import RunningJob, metrics_rows

pytestmark = pytest.mark.skipif(SKIP_REASON is not None, reason=f"hosts testbed: {SKIP_REASON}")

# 40 epochs of digits, every step slowed by 20 ms until the added host has joined: long enough to
# lose a host and add one; the epochs after the join need no pause
CFG = ["data.name=digits", "model.name=mlp", "model.hidden=[32]", "epochs=40", "runtime.progress=false",
       "runtime.threads=1", "test.step_sleep=0.02", "horovod.elastic_commit_steps=5"]


def _worker_on(tb, host) -> Optional[psutil.Process]:
    for pid in netns.pids(host.netns):
        try:
            p = psutil.Process(pid)
            if any(a.endswith("worker.py") for a in p.cmdline()):
                return p
        except psutil.Error:
            continue
    return None


def _steps(run) -> list[int]:
    """The step count at the end of each epoch so far (complete lines only)."""
    path = run / "metrics.jsonl"
    lines = path.read_text().split("\n")[:-1] if path.exists() else []
    return [json.loads(line)["step"] for line in lines]


def _full_epoch_since(run, first_row: int, steps_per_epoch: int) -> bool:
    """An epoch ended at row >= ``first_row`` with ``steps_per_epoch`` steps (with one worker,
    an epoch has twice as many steps)."""
    steps = _steps(run)
    return any(steps[i] - steps[i - 1] == steps_per_epoch for i in range(max(1, first_row), len(steps)))


def test_a_lost_host_leaves_and_an_added_host_joins(testbed, tmp_path):
    tb = testbed
    hosts_file = tmp_path / "hosts.txt"
    hosts_file.write_text("node1:1\nnode2:1\n")
    discover = tmp_path / "discover.sh"
    discover.write_text(f"#!/bin/sh\ncat {hosts_file}\n")
    discover.chmod(0o755)
    run = tmp_path / "run"
    pause = tmp_path / "pause"  # the workers pause at every step while it exists
    pause.touch()
    cmd = ["horovodrun", "-np", "2", "--min-np", "1", "--max-np", "3", "--host-discovery-script", str(discover),
           "--gloo", "--network-interfaces", "eth0", sys.executable, WORKER, *CFG, f"test.pause_file={pause}",
           f"run_dir={run}"]
    with RunningJob(tb.on_host(tb.hosts[0], cmd)) as job:
        job.wait_for("3 epochs", lambda: metrics_rows(run) >= 3)
        two_workers = _steps(run)[0]  # the steps of an epoch with two workers (the first)
        hosts_file.write_text("node1:1\n")  # node2 is lost: killed, and gone from the discovery
        victim = _worker_on(tb, tb.hosts[1])
        assert victim is not None, "no worker runs on node2"
        victim.kill()
        lost_at = metrics_rows(run)
        job.wait_for("3 more epochs with one worker", lambda: metrics_rows(run) >= lost_at + 3)
        hosts_file.write_text("node1:1\nnode3:1\n")  # a host is added
        added_at = metrics_rows(run)
        job.wait_for("a worker on node3", lambda: bool(_worker_on(tb, tb.hosts[2])), timeout=120)
        started_at = metrics_rows(run)
        job.wait_for("an epoch with two workers again", lambda: _full_epoch_since(run, started_at, two_workers))
        pause.unlink()  # joined: the rest of the epochs go at full speed
        code = job.wait(300)
    assert code == 0, job.output[-4000:]
    summary = json.loads((run / "summary.json").read_text())
    workers = [m["workers"] for m in summary["membership"]]
    assert workers[0] == 2 and 1 in workers and workers[-1] == 2, summary["membership"]
    steps = [m["step"] for m in summary["membership"]]
    assert steps == sorted(steps), steps
    assert summary["epochs"] == 40 and summary["workers"] == 2
    assert summary["final_test_accuracy"] >= 0.9, summary
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == list(range(1, 41))  # every epoch once, in order
    assert added_at > lost_at
