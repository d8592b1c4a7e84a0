"""Non-finite training under real mpirun: every rank sees it at the same step; stop keeps the
last good checkpoint, skip leaves the replicas equal and finite and counts the skips."""
from __future__ import annotations

import json
import re
import sys

import pytest
import torch

from conftest import WORKER, assert_same, mpirun, train_params

MLP = ["data.name=digits", "model.name=mlp", "model.hidden=[32]", "epochs=2", "checkpoint.every_epochs=1",
       "checkpoint.resume=never", "runtime.progress=false"]


# "pipeline": rank 1 is the last of 2 stages, the only one that computes a loss; stage 0 (rank 0,
# which writes the summary) must skip the same steps through the norm summed over the stages
HOW = {"horovod": ["strategy=horovod"], "ddp": ["strategy=ddp"],
       "pipeline": ["strategy=horovod", "parallel.pipeline_stages=2", "parallel.microbatches=2"]}


@pytest.mark.parametrize("strategy", ["horovod", "ddp", "pipeline"])
def test_skip_leaves_replicas_equal_finite_and_counted(tmp_path, strategy):
    # rank 1's loss is NaN at two steps: the averaged gradient is NaN on every rank
    params = train_params(2, tmp_path, MLP + [*HOW[strategy], "optim.nonfinite=skip",
                                              "test.nan_rank=1", "test.nan_steps=5,30"])
    assert_same(params[0], params[1], exact=True)
    assert all(bool(torch.isfinite(t).all()) for t in params[0].values() if t.is_floating_point())
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["skipped_steps"] == 2 and s["final_test_accuracy"] > 0.8, s


@pytest.mark.parametrize("strategy,np", [("horovod", 2), ("ddp", 2), ("ps", 3)])
def test_stop_ends_the_job_naming_the_step_and_keeps_the_good_checkpoint(tmp_path, strategy, np):
    from hvd_trainer.checkpoint import load

    res = mpirun(np, [sys.executable, WORKER, *MLP, f"strategy={strategy}", f"run_dir={tmp_path}",
                      "test.nan_rank=1", "test.nan_steps=30"], timeout=120, check=False)
    assert res.returncode != 0, res.output
    # Rank 1's 30th loss call: epoch 1's training steps, then one evaluation call (its half of
    # the 360 held-out samples is one batch of 256), then epoch 2's steps: training step 29.
    per_epoch = int(re.search(r"steps/epoch=(\d+)", res.stdout).group(1))
    assert per_epoch < 29, res.stdout  # loss call 30 falls in epoch 2
    assert "step 29: non-finite gradient" in res.stderr and "optim.nonfinite=stop" in res.stderr, res.stderr[-3000:]
    # epoch 1's checkpoint, the only one, named as the last good one and holding finite weights
    saved = sorted((tmp_path / "checkpoints").glob("*.pt"))
    assert [p.name for p in saved] == [f"ckpt-step{per_epoch:09d}.pt"], saved
    assert f"the last good checkpoint is {saved[0]}" in res.stderr, res.stderr[-3000:]
    weights = load(saved[0])["model"]
    assert all(bool(torch.isfinite(t).all()) for t in weights.values() if t.is_floating_point())
