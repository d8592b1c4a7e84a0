"""DDP's communication hooks (``ddp.comm_hook``) under real mpirun: fp16 stays close to fp32,
PowerSGD trains, keeps the replicas equal, and resumes exactly (its error feedback included)."""
from __future__ import annotations

import pytest
import torch

from conftest import EQUIV_STEPS, assert_resumed, assert_same, summary, train_params, train_run

# the plain-SGD MLP of test_invariants: digits 64 -> 32 -> 10, 2 ranks x batch 8
MLP = ["data.name=digits", "model.name=mlp", "model.hidden=[32]", "optim.name=sgd", "optim.lr=0.05",
       "optim.momentum=0.9", "optim.lr_scaling=none", "epochs=2", "strategy=ddp", "batch_size=8"]
SHORT = MLP + [f"max_steps={EQUIV_STEPS}", "checkpoint.every_epochs=0", "checkpoint.resume=never"]
WARMUP = 10
POWERSGD = ["ddp.comm_hook=powersgd", "ddp.powersgd_rank=2", f"ddp.powersgd_warmup_steps={WARMUP}"]
# weights 32x64 and 10x32, biases 32 and 10: what one rank puts into the allreduces of a step
FP32_BYTES = 4 * (32 * 64 + 32 + 10 * 32 + 10)
POWERSGD_BYTES = 4 * ((32 + 64) * 2 + 32 + (10 + 32) * 2 + 10)  # factors P, Q of rank 2; biases whole


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Each hook's 2-rank run, trained once for the module: (every rank's weights, run dir)."""
    done: dict[str, tuple] = {}

    def get(hook: str):
        if hook not in done:
            run_dir = tmp_path_factory.mktemp(hook)
            extra = POWERSGD if hook == "powersgd" else [f"ddp.comm_hook={hook}"]
            done[hook] = (train_params(2, run_dir, SHORT + extra), run_dir)
        return done[hook]
    return get


def gap(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def test_fp16_hook_is_close_to_fp32_and_halves_the_bytes(runs):
    # fp16 rounds each averaged gradient to ~5e-4 relative: ~1e-3 after EQUIV_STEPS at this lr
    (fp32, fp32_dir), (fp16, fp16_dir) = runs("none"), runs("fp16")
    assert_same(fp16[0], fp32[0], rtol=0, atol=5e-3)
    assert gap(fp16[0], fp32[0]) > 1e-6, "the fp16 hook had no effect"
    assert_same(fp16[0], fp16[1], exact=True)  # every rank decompresses the same sum
    assert summary(fp32_dir)["settings"]["bytes_per_step"] == FP32_BYTES
    assert summary(fp16_dir)["settings"]["bytes_per_step"] == FP32_BYTES // 2


def test_powersgd_trains_and_keeps_the_replicas_equal(runs):
    (plain, plain_dir), (psgd, psgd_dir) = runs("none"), runs("powersgd")
    assert_same(psgd[0], psgd[1], exact=True)  # P and Q are allreduced: one gradient on every rank
    # 30 steps of rank-2 gradients: a different trajectory, by far more than rounding
    assert gap(psgd[0], plain[0]) > 1e-3
    s, ref = summary(psgd_dir), summary(plain_dir)
    assert s["settings"] | {"comm_hook": "powersgd", "powersgd_rank": 2, "powersgd_warmup_steps": WARMUP,
                            "bytes_per_step": POWERSGD_BYTES} == s["settings"], s["settings"]
    # it learned in 40 steps (chance is 0.1, the loss at the start ln 10 = 2.3), about as fp32 did
    acc, ref_acc = s["final_test_accuracy"], ref["final_test_accuracy"]
    assert acc > 0.5 and acc > ref_acc - 0.15 and s["final_test_loss"] < 2.0, (acc, ref_acc, s["final_test_loss"])


def test_powersgd_resume_is_bit_identical_to_uninterrupted(tmp_path, runs):
    # stopped at step 25, past the warm-up: the error feedback, the factors Q (warm start) and
    # PowerSGD's random stream and step count all have to come back on each rank
    straight = runs("powersgd")[0]
    cfg = MLP + POWERSGD + ["checkpoint.every_epochs=0"]  # written at the stop only
    stopped = tmp_path / "stopped"
    first = train_params(2, stopped, cfg + ["max_steps=25"])
    assert summary(stopped)["steps"] == 25 and not torch.equal(first[0]["net.1.weight"], straight[0]["net.1.weight"])
    resumed, res = train_run(2, stopped, cfg + [f"max_steps={EQUIV_STEPS}"])
    assert_resumed(res.stdout, stopped, 25)
    assert "note:" not in res.stdout and "restarts" not in res.output, res.output  # nothing restarted
    assert_same(resumed[0], straight[0], exact=True)
    assert_same(resumed[1], straight[1], exact=True)
