"""The monitor inside real (one-process) runs: TensorBoard's own reader gets the scalars at the
right steps, also across a resume that rolled steps back; the summary carries the breakdown."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from hvd_trainer import load_config, train

BASE = ["digits", "strategy=single", "runtime.threads=1", "runtime.progress=false", "batch_size=64",
        "runtime.tensorboard=true", "checkpoint.keep=5", "checkpoint.every_epochs=1"]


def _train(run_dir: Path, *overrides: str) -> dict:
    threads = torch.get_num_threads()
    try:
        return train(load_config(BASE[0], [*BASE[1:], f"run_dir={run_dir}", *overrides]))
    finally:
        torch.set_num_threads(threads)


def _scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def test_tensorboard_scalars_at_their_steps_also_across_a_rolled_back_resume(tmp_path):
    first = _train(tmp_path, "epochs=3")
    per_epoch = first["steps"] // 3
    steps = [per_epoch * e for e in (1, 2, 3)]
    got = _scalars(tmp_path)
    for tag in ("train/loss", "test/accuracy", "test/loss", "throughput/samples_per_sec", "time/step_ms"):
        assert [s for s, _ in got[tag]] == steps, tag
    assert [s for s, _ in got["lr"]] == list(range(1, steps[2] + 1))  # every step's
    assert [v for _, v in got["test/accuracy"]] == pytest.approx([r["test_accuracy"] for r in _rows(tmp_path)])
    assert any(tag.startswith("time/rank0/") for tag in got) and any(tag.startswith("memory/rank0/") for tag in got)
    # the newest checkpoint lost: the next run resumes at epoch 2 and trains epochs 3 and 4 again
    newest = max((tmp_path / "checkpoints").glob("ckpt-step*.pt"))
    assert newest.name == f"ckpt-step{steps[2]:09d}.pt"
    newest.unlink()
    second = _train(tmp_path, "epochs=4", "seed=1")  # another seed only changes what is retrained
    assert second["resumed_from_step"] == steps[1]
    rows = _rows(tmp_path)
    assert [r["step"] for r in rows] == steps + [per_epoch * 4]
    got = _scalars(tmp_path)
    for tag in ("train/loss", "test/accuracy"):
        assert [s for s, _ in got[tag]] == [r["step"] for r in rows], tag
    # every step once: what the first run wrote after the checkpoint it resumed from is gone
    assert [s for s, _ in got["lr"]] == list(range(1, rows[-1]["step"] + 1))
    # epoch 3's values are the second run's, not the rolled-back first run's
    assert [v for _, v in got["train/loss"]] == pytest.approx([r["train_loss"] for r in rows])


def test_the_summary_holds_the_breakdown_and_a_profile_window_writes_a_trace(tmp_path):
    s = _train(tmp_path, "epochs=2", "batch_size=8", "runtime.tensorboard=false", "runtime.profile_steps=[2,3]")
    (rank,) = s["ranks"]
    parts = [rank[f"{p}_s"] for p in ("data", "compute", "exchange", "optimizer", "other")]
    assert sum(parts) == pytest.approx(rank["step_s"]) and rank["exchange_s"] == 0.0
    assert rank["compute_s"] > 0 and rank["steps"] == s["steps"] and s["stragglers"] == []
    assert rank["step_s"] * rank["steps"] == pytest.approx(s["train_seconds"], rel=0.05)
    trace = json.loads((tmp_path / "traces" / "rank0.json").read_text())
    assert trace["traceEvents"]
