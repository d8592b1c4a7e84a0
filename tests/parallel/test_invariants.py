"""Multi-rank invariants of the Horovod (and DDP) strategies, under real mpirun."""
from __future__ import annotations

import pytest
import torch

from conftest import EQUIV_STEPS, assert_resumed, assert_same, summary, train_local, train_params, train_run

# Plain-SGD MLP on the digits set; lr scaling off so different rank counts use the same lr.
MLP = ["data.name=digits", "model.name=mlp", "model.hidden=[32]", "optim.name=sgd", "optim.lr=0.05",
       "optim.momentum=0.9", "optim.lr_scaling=none", "epochs=2", "checkpoint.every_epochs=0",
       "checkpoint.resume=never"]
# comparisons across rank counts or strategies stop inside the rounding horizon (conftest)
MLP_SHORT = MLP + [f"max_steps={EQUIV_STEPS}"]
# dropout draws from per-rank streams, so only the exchange keeps the replicas equal
DROPOUT = MLP + ["model.dropout=0.1", "seed=7"]


def short(strategy: str) -> list[str]:
    return MLP_SHORT + [f"strategy={strategy}", "batch_size=8"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Jobs that several tests compare (2 ranks at b vs 1 at 2b, Horovod vs DDP, fp16 vs fp32;
    same seed, Adasum vs average): each trained once for the module, by its np and config."""
    done: dict[tuple, tuple] = {}

    def get(np: int, overrides: list[str], with_dir: bool = False):
        """The ranks' final weights (and the run dir, ``with_dir``)."""
        key = (np, tuple(overrides))
        if key not in done:
            run_dir = tmp_path_factory.mktemp("run")
            done[key] = (train_params(np, run_dir, overrides), run_dir)
        return done[key] if with_dir else done[key][0]
    return get


@pytest.mark.parametrize("np", [2, 3])
def test_parameters_identical_on_every_rank(runs, np):
    params = runs(np, DROPOUT)
    assert len(params) == np  # every rank wrote its own weights: nothing compared is missing
    for other in params[1:]:
        assert_same(params[0], other, exact=True)


@pytest.mark.parametrize("strategy", ["horovod", "ddp"])
def test_two_ranks_at_b_equal_one_rank_at_2b(tmp_path, runs, strategy):
    two = runs(2, short(strategy))[0]
    one = train_local(tmp_path / "one", MLP_SHORT + ["batch_size=16"])
    assert_same(two, one)


def test_clipping_uses_the_averaged_gradient(tmp_path):
    # a tight clip is active every step; it must see the global gradient, not each rank's
    clip = MLP_SHORT + ["optim.grad_clip=0.05"]
    two = train_params(2, tmp_path / "two", clip + ["batch_size=8"])[0]
    one = train_local(tmp_path / "one", clip + ["batch_size=16"])
    unclipped = train_local(tmp_path / "free", MLP_SHORT + ["batch_size=16"])
    assert_same(two, one)
    assert not torch.allclose(one["net.1.weight"], unclipped["net.1.weight"], atol=1e-3)


@pytest.mark.parametrize("np,b,k", [(2, 8, 2)])  # one rank: tests/unit/test_loop.py
def test_accumulation_of_k_micro_batches_equals_one_big_batch(tmp_path, np, b, k):
    accumulated = train_params(np, tmp_path / "acc", MLP_SHORT + [f"batch_size={b}", f"optim.accumulation_steps={k}"])[0]
    big = train_local(tmp_path / "big", MLP_SHORT + [f"batch_size={b * k * np}"])
    assert_same(accumulated, big)


def test_fp16_compression_close_to_fp32(tmp_path, runs):
    # fp16 rounds each gradient to ~5e-4 relative: ~lr * 5e-4 per step, ~1e-3 after EQUIV_STEPS
    fp32 = runs(2, short("horovod"))[0]
    fp16 = train_params(2, tmp_path / "fp16", short("horovod") + ["horovod.compression=fp16"])[0]
    assert_same(fp16, fp32, rtol=0, atol=5e-3)
    assert any(not torch.equal(fp16[k], fp32[k]) for k in fp32), "fp16 compression had no effect"


@pytest.mark.parametrize("np", [2])  # one process: tests/unit/test_loop.py
def test_same_seed_gives_bit_identical_weights(tmp_path, runs, np):
    a = runs(np, DROPOUT)[0]
    b = train_params(np, tmp_path / "b", DROPOUT)[0]
    assert_same(a, b, exact=True)
    c = train_params(np, tmp_path / "c", MLP + ["model.dropout=0.1", "seed=8"])[0]
    assert not torch.equal(a["net.1.weight"], c["net.1.weight"])


@pytest.mark.parametrize("strategy", ["horovod", "ddp"])
def test_resumed_run_is_bit_identical_to_uninterrupted(tmp_path, strategy):
    # dropout (RNG streams), momentum (optimizer state), cosine + warmup (scheduler), and a
    # stop in the middle of an epoch (data position) all have to be restored exactly
    cfg = ["data.name=digits", "model.name=mlp", "model.hidden=[32]", "model.dropout=0.1",
           "optim.lr=0.05", "optim.warmup_epochs=1", "optim.schedule=cosine", "epochs=3",
           "batch_size=16", "checkpoint.every_steps=20", "checkpoint.every_epochs=1",
           "checkpoint.keep=2", f"strategy={strategy}"]
    straight = train_params(2, tmp_path / "straight", cfg + ["checkpoint.resume=never"])[0]
    total = summary(tmp_path / "straight")["steps"]
    stopped = tmp_path / "stopped"
    first = train_params(2, stopped, cfg + ["max_steps=57"])[0]
    assert summary(stopped)["steps"] == 57 < total  # it really stopped early
    assert not torch.equal(first["net.1.weight"], straight["net.1.weight"])
    ckpts = sorted((stopped / "checkpoints").glob("ckpt-step*.pt"))
    assert [p.name for p in ckpts] == ["ckpt-step000000045.pt", "ckpt-step000000057.pt"]  # keep=2
    resumed, res = train_run(2, stopped, cfg)
    assert_resumed(res.stdout, stopped, 57)  # not a fresh start that happens to match
    assert summary(stopped)["steps"] == total
    assert_same(resumed[0], straight, exact=True)


@pytest.mark.parametrize("strategy", ["horovod", "ddp"])
def test_sync_batchnorm_two_ranks_equal_one_rank_double_batch(tmp_path, strategy):
    # SGD at lr 0.05 on this ResNet amplifies rounding after ~60 steps on some CPUs (see
    # conftest): compare after EQUIV_STEPS, where the gap is ~1e-8 per step
    cnn = ["data.name=digits", "model.name=resnet", "model.channels=[8,16]", "model.sync_batchnorm=true",
           "optim.lr=0.05", "optim.lr_scaling=none", "epochs=1", "checkpoint.every_epochs=0",
           "checkpoint.resume=never", f"max_steps={EQUIV_STEPS}", f"strategy={strategy}"]
    two = train_params(2, tmp_path / "two", cnn + ["batch_size=8"])
    one = train_local(tmp_path / "one", cnn + ["batch_size=16"])
    assert_same(two[0], one)
    # running statistics are global too, so both replicas agree without any broadcast: the same
    # allreduced sums enter the same arithmetic on both ranks
    assert_same(two[0], two[1], exact=True)


def test_horovod_and_ddp_agree(runs):
    (hvd, hvd_dir), (ddp, ddp_dir) = runs(2, short("horovod"), with_dir=True), runs(2, short("ddp"), with_dir=True)
    assert_same(hvd[0], ddp[0])
    # both measured their exchange: DDP's through its communication hook (the same averaging
    # allreduce as no hook, or the weights above would differ)
    for run_dir in (hvd_dir, ddp_dir):
        for rank in summary(run_dir)["ranks"]:
            assert rank["exchange_s"] > 0 and rank["compute_s"] > 0, (run_dir, rank)


def test_adasum_keeps_replicas_equal_and_learns(tmp_path, runs):
    # with dropout, the replicas' gradients differ: only the exchange keeps them equal
    params = train_params(2, tmp_path / "adasum", DROPOUT + ["horovod.op=adasum"])
    assert len(params) == 2
    assert_same(params[0], params[1], exact=True)
    s = summary(tmp_path / "adasum")
    assert s["settings"]["op"] == "adasum" and s["final_test_accuracy"] > 0.8, s
    # Adasum really ran: the same seed averaged ends elsewhere, by far more than rounding
    # (an Adasum that fell back to averaging would differ by float32 rounding at most)
    average = runs(2, DROPOUT)[0]  # horovod.op=average is the default
    gap = max(float((params[0][k] - average[k]).abs().max()) for k in average)
    assert gap > 1e-3, f"Adasum and average differ by {gap:.2e} only"
