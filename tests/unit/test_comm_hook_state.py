"""``ddp.comm_hook`` without ranks: the config checks, the bytes estimate against torch's own
rule, and PowerSGD's state through a weights-only checkpoint and back."""
from __future__ import annotations

import io

import pytest
import torch
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks.powerSGD_hook import _should_compress

from hvd_trainer import load_config
from hvd_trainer.config import ConfigError
from hvd_trainer.strategies.ddp import DDPStrategy
from hvd_trainer.strategies.ddp_hooks import MIN_COMPRESSION, CommHook, _slices


def hook(kind: str, *extra: str) -> CommHook:
    return CommHook(load_config(None, [f"ddp.comm_hook={kind}", *extra]).ddp, seed=3)


@pytest.mark.parametrize("override,message", [
    ("ddp.comm_hook=bf16", "ddp.comm_hook: input should be 'none', 'fp16' or 'powersgd'"),
    ("ddp.powersgd_rank=0", "ddp.powersgd_rank: input should be greater than or equal to 1"),
    ("ddp.powersgd_warmup_steps=1", "ddp.powersgd_warmup_steps: input should be greater than or equal to 2"),
])
def test_bad_hook_settings_name_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert str(err.value).startswith(message) and "\n" not in str(err.value), err.value


@pytest.mark.parametrize("kind", ["fp16", "powersgd"])
def test_compressing_hooks_are_refused_under_pipeline_stages(kind):
    pipelined = ["strategy=ddp", "parallel.pipeline_stages=2"]
    DDPStrategy.check(load_config(None, pipelined), 2)  # plain allreduce pipelines
    DDPStrategy.check(load_config(None, ["strategy=ddp", f"ddp.comm_hook={kind}"]), 2)
    with pytest.raises(ConfigError, match=f"^ddp.comm_hook: {kind} is not supported with parallel.pipeline_stages > 1"):
        DDPStrategy.check(load_config(None, pipelined + [f"ddp.comm_hook={kind}"]), 2)


def test_bytes_per_step_in_closed_form():
    params = list(nn.Sequential(nn.Linear(64, 32), nn.Linear(32, 10)).parameters())
    fp32 = 4 * (32 * 64 + 32 + 10 * 32 + 10)
    assert hook("none").bytes_per_step(params) == fp32
    assert hook("fp16").bytes_per_step(params) == fp32 // 2
    psgd = hook("powersgd", "ddp.powersgd_rank=2", "ddp.powersgd_warmup_steps=10")
    assert psgd.bytes_per_step(params) == 4 * ((32 + 64) * 2 + 32 + (10 + 32) * 2 + 10)
    assert psgd.bytes_per_step(params, step=9) == fp32 and psgd.bytes_per_step(params, step=10) < fp32
    # at rank 16 neither matrix is 2x smaller as factors: sent whole
    assert hook("powersgd", "ddp.powersgd_rank=16").bytes_per_step(params) == fp32


@pytest.mark.parametrize("n,m,r", [(32, 64, 2), (10, 32, 2), (10, 32, 4), (4, 4, 1), (100, 1, 1), (3, 5, 8)])
def test_the_estimate_factors_the_matrices_torch_factors(n, m, r):
    rank = min(n, m, r)
    factored, whole, small = _should_compress(n, m, rank, MIN_COMPRESSION)
    p = nn.Parameter(torch.zeros(n, m))
    assert hook("powersgd", f"ddp.powersgd_rank={r}").bytes_per_step([p]) == 4 * (small if factored else whole)


def filled(h: CommHook) -> CommHook:
    """A PowerSGD hook as after some compressed steps: parameter 0 a 16 x 12 weight (factored at
    rank 2), parameter 1 its bias, both in bucket 0, in the order backward made them ready."""
    s = h.powersgd
    h._shapes, h._layout[0] = [(16, 12), (16,)], (1, 0)
    s.error_dict[0], s.p_memory_dict[0], s.q_memory_dict[0] = torch.randn(16 + 192), torch.randn(32), torch.randn(24)
    s.iter = 17
    s.rng.randint(1_000_000_000)  # the stream has moved on
    return h


def through_checkpoint(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("order", [(1, 0), (0, 1)])
def test_powersgd_state_comes_back_exactly_on_any_bucket_layout(order):
    # a new DDP's first step runs on its initial buckets (parameters in model order), the saved
    # memory is of the buckets rebuilt in the order backward made the gradients ready
    saved = filled(hook("powersgd"))
    back = hook("powersgd")
    back._shapes = saved._shapes
    assert back.load_state_dict(through_checkpoint(saved.state_dict())) is None
    assert back.powersgd.iter == 17 and back.powersgd.rng.randint(10**9) == saved.powersgd.rng.randint(10**9)
    back._layout[0] = order
    back._install(0, torch.device("cpu"))
    old, new = saved.powersgd, back.powersgd
    weight_error, bias_error = old.error_dict[0][16:], old.error_dict[0][:16]
    expected = torch.cat([bias_error, weight_error] if order == (1, 0) else [weight_error, bias_error])
    assert torch.equal(new.error_dict[0], expected)
    assert torch.equal(new.p_memory_dict[0], old.p_memory_dict[0]) and torch.equal(new.q_memory_dict[0], old.q_memory_dict[0])


def test_factors_are_laid_out_as_torch_does_grouped_by_shape():
    # 16x12 and 6x40 are factored at rank 2, the bias and the 4x4 are not; same shapes together
    slices = _slices([(16, 12), (16,), (6, 40), (4, 4), (16, 12)], 2)
    assert [e for e, _, _ in slices] == [slice(0, 192), slice(192, 208), slice(208, 448), slice(448, 464),
                                         slice(464, 656)]
    assert [p for _, p, _ in slices] == [slice(0, 32), None, slice(64, 76), None, slice(32, 64)]
    assert [q for _, _, q in slices] == [slice(0, 24), None, slice(48, 128), None, slice(24, 48)]


def test_what_cannot_be_restored_is_a_note():
    assert "starts over" in hook("powersgd", "ddp.powersgd_rank=4").load_state_dict(filled(hook("powersgd")).state_dict())
    assert "no PowerSGD state" in hook("powersgd").load_state_dict(None)
    assert hook("fp16").state_dict() == {} and hook("fp16").load_state_dict(None) is None


def test_forget_drops_the_memory_a_skipped_step_left():
    h = filled(hook("powersgd"))
    h.forget()
    s = h.powersgd
    assert not s.error_dict and not s.p_memory_dict and not s.q_memory_dict and s.iter == 17
