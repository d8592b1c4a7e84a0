"""Local SGD and DiLoCo under real mpirun: H = 1 is synchronous data parallelism; with H > 1 the
ranks agree right after each averaging and differ in between; a run stopped mid-round resumes
bit-identical, each rank from its own state."""
from __future__ import annotations

import pytest
import torch

from conftest import EQUIV_STEPS, assert_resumed, assert_same, summary, train_params, train_run

MLP = ["data.name=digits", "model.name=mlp", "model.hidden=[32]", "optim.name=sgd", "optim.lr=0.05",
       "optim.momentum=0.9", "optim.lr_scaling=none", "batch_size=16", "epochs=1",
       "checkpoint.every_epochs=0", "checkpoint.resume=never"]
OUTER = {"average": ["local.outer=average"],
         "nesterov": ["local.outer=nesterov", "local.outer_lr=0.7", "local.outer_momentum=0.9"]}


def test_averaging_every_step_is_synchronous_data_parallelism(tmp_path):
    # SGD with momentum is linear: the mean of the ranks' local steps is the step on the mean
    # gradient, and the mean of their momenta the momentum of the mean
    args = MLP + [f"max_steps={EQUIV_STEPS}"]
    local = train_params(2, tmp_path / "local", args + ["strategy=local_sgd", "local.sync_every=1"])
    sync = train_params(2, tmp_path / "sync", args + ["strategy=horovod"])
    assert_same(local[0], local[1], exact=True)
    assert_same(local[0], sync[0])


@pytest.mark.parametrize("outer", ["average", "nesterov"])
def test_ranks_agree_after_each_averaging_and_a_mid_round_stop_resumes_exactly(tmp_path, outer):
    args = MLP + ["strategy=local_sgd", "local.sync_every=4", *OUTER[outer]]
    whole = train_params(2, tmp_path / "whole", args + ["max_steps=12"])  # averaged at 4, 8, 12
    assert_same(whole[0], whole[1], exact=True)
    assert summary(tmp_path / "whole")["averagings"] == 3

    run = tmp_path / "stopped"
    half = train_params(2, run, args + ["max_steps=6"])  # two steps into the second round
    differ = [k for k in half[0] if not torch.equal(half[0][k], half[1][k])]
    assert differ, "the ranks' parameters were equal between averagings: they did not train alone"

    resumed, res = train_run(2, run, args + ["max_steps=12", "checkpoint.resume=auto"])
    assert_resumed(res.stdout, run, 6)
    for r in range(2):  # each rank went on from its own mid-round state
        assert_same(resumed[r], whole[r], exact=True)
    s = summary(run)
    assert s["averagings"] == 3 and s["bytes_sent_per_rank"] > 0
