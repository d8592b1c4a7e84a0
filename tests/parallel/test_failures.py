"""Non-finite training under real mpirun: every rank sees it at the same step; stop keeps the
last good checkpoint, skip leaves the replicas equal and finite and counts the skips."""
from __future__ import annotations

import json
import sys

import pytest
import torch

from conftest import WORKER, assert_same, mpirun, train_params

MLP = ["data.name=digits", "model.name=mlp", "model.hidden=[32]", "epochs=2", "checkpoint.every_epochs=1",
       "checkpoint.resume=never", "runtime.progress=false"]


@pytest.mark.parametrize("strategy", ["horovod", "ddp"])
def test_skip_leaves_replicas_equal_finite_and_counted(tmp_path, strategy):
    # rank 1's loss is NaN at two steps: the averaged gradient is NaN on every rank
    params = train_params(2, tmp_path, MLP + [f"strategy={strategy}", "optim.nonfinite=skip",
                                              "test.nan_rank=1", "test.nan_steps=5,30"])
    assert_same(params[0], params[1], exact=True)
    assert all(bool(torch.isfinite(t).all()) for t in params[0].values() if t.is_floating_point())
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["skipped_steps"] == 2 and s["final_test_accuracy"] > 0.8, s


@pytest.mark.parametrize("strategy,np", [("horovod", 2), ("ddp", 2), ("ps", 3)])
def test_stop_ends_the_job_naming_the_step_and_keeps_the_good_checkpoint(tmp_path, strategy, np):
    res = mpirun(np, [sys.executable, WORKER, *MLP, f"strategy={strategy}", f"run_dir={tmp_path}",
                      "test.nan_rank=1", "test.nan_steps=30"], timeout=120, check=False)
    assert res.returncode != 0, res.output
    assert "non-finite gradient" in res.stderr and "optim.nonfinite=stop" in res.stderr, res.stderr[-3000:]
    assert "the last good checkpoint is" in res.stderr  # epoch 1 was saved (loss call 30 is in epoch 2)
    for path in (tmp_path / "checkpoints").glob("*.pt"):
        from hvd_trainer.checkpoint import load
        weights = load(path)["model"]
        assert all(bool(torch.isfinite(t).all()) for t in weights.values() if t.is_floating_point())


def test_skips_beyond_the_limit_stop(tmp_path):
    res = mpirun(2, [sys.executable, WORKER, *MLP, f"run_dir={tmp_path}", "optim.nonfinite=skip",
                     "optim.max_skipped_steps=1", "test.nan_rank=0", "test.nan_steps=3,4"], timeout=120, check=False)
    assert res.returncode != 0 and "more than optim.max_skipped_steps=1" in res.stderr, res.stderr[-3000:]


def test_a_huge_lr_stops_instead_of_training_on_nan(tmp_path):
    res = mpirun(2, ["hvd-train", "digits", "optim.lr=1000000.0", "epochs=2", "runtime.progress=false",
                     f"run_dir={tmp_path}"], timeout=120, check=False)
    assert res.returncode != 0 and "non-finite gradient" in res.stderr, res.output[-3000:]
    assert not (tmp_path / "summary.json").exists()
    assert not list(tmp_path.glob("checkpoints/*.pt"))  # nothing non-finite was written
