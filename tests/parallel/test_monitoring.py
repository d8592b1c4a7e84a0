"""Seeing inside a real multi-rank run: the time breakdown adds up, a slow rank is named (and a
balanced run names nobody), the live /metrics endpoint agrees with the summary, traces are
written on request, a metrics port already in use is a config error, and hvd-report draws runs."""
from __future__ import annotations

import json
import socket
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import BIN, WORKER, mpirun, run_cmd, summary, train_run
from mpi_jobs import mpirun_command
from running import RunningJob

PARTS = ("data", "compute", "exchange", "optimizer", "other")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _scrape(port: int) -> dict[tuple, float]:
    """``(name, sorted label items) -> value`` of every sample, or {} while nothing listens."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
    except OSError:
        return {}
    return {(s.name, tuple(sorted((k, v) for k, v in s.labels.items() if k in ("rank", "part")))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def test_breakdown_adds_up_and_metrics_are_served_live(tmp_path):
    port, run = _free_port(), tmp_path / "run"
    timeline = tmp_path / "timeline.json"
    program = [sys.executable, WORKER, f"run_dir={run}", "runtime.progress=false", "epochs=3",
               "batch_size=16", "test.step_sleep=0.01", f"runtime.metrics_port={port}",
               "runtime.metrics_linger_s=8", "runtime.profile_steps=[3,5]", f"horovod.timeline={timeline}"]
    scrapes = []
    with RunningJob(mpirun_command(2, program), program_marker="worker.py") as job:
        deadline = time.monotonic() + 180
        while not (run / "summary.json").exists() and job.proc.poll() is None and time.monotonic() < deadline:
            got = _scrape(port)
            if got:
                scrapes.append(got)
            time.sleep(0.1)
        time.sleep(0.5)  # the sink takes the summary's final values right after writing it
        final = _scrape(port)
        job.proc.wait(timeout=120)  # it serves 8 s more, then ends
    assert job.proc.returncode == 0, job.output[-4000:]
    s = summary(run)
    # live: scrapes during training saw steps inside an epoch, not only the epoch ends
    per_epoch = s["steps"] // 3
    steps_seen = [g[("hvd_trainer_step", ())] for g in scrapes if ("hvd_trainer_step", ()) in g]
    assert any(0 < v < s["steps"] and v % per_epoch for v in steps_seen), steps_seen[:20]
    assert final[("hvd_trainer_step", ())] == s["steps"]
    assert final[("hvd_trainer_test_accuracy", ())] == pytest.approx(s["final_test_accuracy"])
    assert final[("hvd_trainer_train_loss", ())] == pytest.approx(s["final_train_loss"])
    last = _rows(run)[-1]
    for r in (0, 1):
        for part in PARTS:
            got = final[("hvd_trainer_step_seconds", (("part", part), ("rank", str(r))))]
            assert got == pytest.approx(last["ranks"][r][f"{part}_s"], rel=1e-6)
    # the parts add up to the step time every rank measured, within 5%; rank 0's steps are
    # what its epoch timer measured as training time (no checkpoint inside the epochs here)
    assert [r["rank"] for r in s["ranks"]] == [0, 1]
    for r in s["ranks"]:
        assert r["steps"] == s["steps"]
        assert sum(r[f"{p}_s"] for p in PARTS) == pytest.approx(r["step_s"], rel=1e-9)
        assert all(r[f"{p}_s"] >= 0 for p in PARTS)
        assert r["compute_s"] > 0.01  # the 10 ms sleep sits in the loss: compute
        assert 0 < r["rss_mb"] <= r["peak_rss_mb"] + 1 and r["cpu_util"] > 0
    total = s["ranks"][0]["step_s"] * s["ranks"][0]["steps"]
    assert total == pytest.approx(s["train_seconds"], rel=0.05)
    assert s["ranks"][1]["step_s"] * s["steps"] == pytest.approx(s["train_seconds"], rel=0.05)
    assert "step " in job.stdout and "compute " in job.stdout and "exchange " in job.stdout
    # traces on request: a Chrome trace per rank over steps 3..5, and Horovod's timeline
    for r in (0, 1):
        trace = json.loads((run / "traces" / f"rank{r}.json").read_text())
        assert len(trace["traceEvents"]) > 10
    assert "ALLREDUCE" in timeline.read_text()


def test_a_rank_with_a_slow_data_path_is_named_and_a_balanced_run_names_none(tmp_path):
    common = ["epochs=2", "batch_size=16", "runtime.straggler_min_ms=5", "checkpoint.every_epochs=0"]
    _, slow = train_run(3, tmp_path / "slow", [*common, "test.data_sleep=2:30"])
    _, even = train_run(3, tmp_path / "even", common)
    warned = [line for line in slow.stdout.splitlines() if "straggler:" in line]
    assert warned and all("straggler: rank 2 on " in w and "data wait" in w for w in warned), slow.stdout[-3000:]
    s = summary(tmp_path / "slow")
    assert {(x["rank"], x["part"]) for x in s["stragglers"]} == {(2, "data")}
    assert s["ranks"][2]["data_s"] > 0.025 > s["ranks"][0]["data_s"]
    # the fast ranks wait for it in the exchange
    assert s["ranks"][0]["exchange_s"] > 0.02
    assert "straggler:" not in even.stdout and summary(tmp_path / "even")["stragglers"] == []
    # hvd-report draws both runs side by side
    res = run_cmd([str(BIN / "hvd-report"), str(tmp_path / "slow"), str(tmp_path / "even"),
                   "--out", str(tmp_path / "report")], timeout=120)
    assert res.returncode == 0, res.output
    pngs = sorted(p.name for p in (tmp_path / "report").glob("*.png"))
    assert pngs == ["loss_accuracy.png", "memory.png", "throughput.png", "time_breakdown.png"]
    html = (tmp_path / "report" / "report.html").read_text()
    assert "data:image/png;base64," in html and "slow" in html and "even" in html


def test_a_metrics_port_in_use_is_a_config_error_before_training(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        res = mpirun(2, [str(BIN / "hvd-train"), "digits", f"run_dir={tmp_path}", "runtime.progress=false",
                         f"runtime.metrics_port={port}"], timeout=120, check=False)
    assert res.returncode == 2, res.output[-3000:]
    errors = [line for line in res.stderr.splitlines() if "config error" in line]
    assert errors and errors[0] == f"hvd-train: config error: runtime.metrics_port: 127.0.0.1:{port} is already in use"
    assert not (tmp_path / "metrics.jsonl").exists() or not (tmp_path / "metrics.jsonl").read_text().strip()
