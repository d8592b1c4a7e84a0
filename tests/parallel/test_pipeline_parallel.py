"""Pipeline stages under real mpirun: a pipelined model trains exactly like the uncut one, and
replicas of a pipeline exchange like plain data parallelism.

The schedules x stage counts x models grid is covered pairwise (each model under each schedule
and each stage count once): the schedules differ only in the order of the same passes, which
tests/unit/test_pipeline_rules.py checks exhaustively without ranks.
"""
from __future__ import annotations

import pytest

from conftest import assert_same, summary, train_local, train_params, train_run
from hvd_trainer.checkpoint import whole_model
from hvd_trainer.config import ConfigError

STEPS = 20  # well inside the rounding horizon of conftest.EQUIV_STEPS
COMMON = ["optim.name=sgd", "optim.lr=0.05", "optim.momentum=0.9", "optim.lr_scaling=none", "epochs=1",
          f"max_steps={STEPS}", "checkpoint.every_epochs=0", "checkpoint.resume=never"]
# no dropout: a stage draws from its own rank's stream, the uncut model from one
TRANSFORMER = COMMON + ["data.name=text", "data.text_bytes=24000", "data.seq_len=16", "model.name=transformer",
                        "model.layers=2", "model.heads=2", "model.width=32", "batch_size=8"]
RESNET = COMMON + ["data.name=synthetic", "data.synthetic_samples=512", "data.synthetic_shape=[3,8,8]",
                   "data.synthetic_classes=4", "model.name=resnet", "model.channels=[4,8]"]
MODELS = {"transformer": TRANSFORMER, "resnet": RESNET}


def pipelined(stages: int, m: int, schedule: str) -> list[str]:
    return [f"parallel.pipeline_stages={stages}", f"parallel.microbatches={m}", f"parallel.schedule={schedule}"]


# a clip that acts at every step (the gradient norm is ~1): it must see the whole model's norm,
# summed over the stages, not each stage's part of it
CLIP = ["optim.grad_clip=0.05"]


@pytest.mark.parametrize("model,stages,schedule,m,extra", [
    ("transformer", 2, "gpipe", 4, []), ("transformer", 3, "1f1b", 4, CLIP),
    ("resnet", 2, "1f1b", 2, []), ("resnet", 3, "gpipe", 2, [])])
def test_p_stages_with_m_microbatches_train_like_one_process(tmp_path, model, stages, schedule, m, extra):
    if model == "transformer":  # one process, the whole batch
        args = one = MODELS[model] + extra
    else:  # BatchNorm normalises over what one pass sees: one process runs the same m pieces
        args = MODELS[model] + ["batch_size=16"]
        one = MODELS[model] + [f"batch_size={16 // m}", f"optim.accumulation_steps={m}"]
    params, res = train_run(stages, tmp_path / "pp", args + pipelined(stages, m, schedule))
    ref = train_local(tmp_path / "one", one)
    assert len(params) == stages
    for p in params:  # every stage returns the whole model, assembled over the pipeline
        assert_same(p, ref)
    assert f"pipeline: {stages} stages x 1 replicas, {m} microbatches per batch, schedule {schedule}" in res.stdout
    assert summary(tmp_path / "pp")["steps"] == STEPS

    # the checkpoint holds the whole model, which the uncut model loads; resuming it without the
    # same stages is one line naming the layout
    ckpt = tmp_path / "pp" / "checkpoints" / f"ckpt-step{STEPS:09d}.pt"
    assert_same(whole_model(ckpt), ref)
    with pytest.raises(ConfigError, match=f"written with parallel.pipeline_stages={stages}, this run has 1"):
        train_local(tmp_path / "pp", args + ["checkpoint.resume=auto"])


@pytest.mark.parametrize("strategy", ["horovod", "ddp"])  # a Horovod process set, a DDP sub-group
def test_two_replicas_of_two_stages_equal_two_data_parallel_ranks(tmp_path, strategy):
    args = MODELS["transformer"] + [f"strategy={strategy}"]
    hybrid, res = train_run(4, tmp_path / "dxp", args + pipelined(2, 2, "1f1b"))
    plain = train_params(2, tmp_path / "dp", args)
    assert len(hybrid) == 4
    for p in hybrid:
        assert_same(p, plain[0])
    assert "replica 1: stage 0=rank 2" in res.stdout and "stage 1=rank 3" in res.stdout
