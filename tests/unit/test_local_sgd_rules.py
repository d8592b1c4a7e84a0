"""Local SGD and DiLoCo without ranks: the outer step in closed form, the traffic estimate, the
config."""
from __future__ import annotations

import pytest
import torch

from hvd_trainer.config import ConfigError, load_config
from hvd_trainer.strategies.base import ring_bytes
from hvd_trainer.strategies.local_sgd import outer_optimizer, outer_step

pytestmark = pytest.mark.unit


def _tensors(seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(3, 4, generator=g), torch.randn(5, generator=g)]


def test_an_outer_step_with_lr_1_and_no_momentum_is_plain_averaging():
    anchor, averaged = _tensors(0), _tensors(1)
    opt = outer_optimizer(anchor, "sgd", lr=1.0, momentum=0.9)  # momentum is nesterov's only
    outer_step(anchor, averaged, opt)
    for a, avg in zip(anchor, averaged):
        torch.testing.assert_close(a, avg, rtol=0, atol=1e-6)


def test_nesterov_outer_steps_in_closed_form():
    anchor, lr, mu = _tensors(2), 0.7, 0.9
    start = [a.clone() for a in anchor]
    opt = outer_optimizer(anchor, "nesterov", lr=lr, momentum=mu)
    rounds = [_tensors(3), _tensors(4)]
    w, v = [a.clone() for a in start], [torch.zeros_like(a) for a in start]
    for averaged in rounds:
        outer_step(anchor, averaged, opt)
        for i, avg in enumerate(averaged):
            g = w[i] - avg                      # the pseudo-gradient
            v[i] = mu * v[i] + g                 # torch: the first buffer is g itself
            w[i] = w[i] - lr * (g + mu * v[i])  # Nesterov: the gradient plus the look-ahead
    for a, expected in zip(anchor, w):
        torch.testing.assert_close(a, expected, rtol=1e-6, atol=1e-6)
    assert all(p.grad is None for p in anchor)  # nothing left over for the next round


def test_ring_bytes_is_two_n_minus_one_over_n_of_the_payload():
    ts = [torch.zeros(250), torch.zeros(10, 25)]  # 500 floats, 2000 bytes
    assert ring_bytes(ts, 1) == 0
    assert ring_bytes(ts, 2) == 2000
    assert ring_bytes(ts, 4) == 3000
    assert ring_bytes(ts, 4, 0.5) == 1500


@pytest.mark.parametrize("override,key", [
    ("local.sync_every=0", "local.sync_every"), ("local.outer=adam", "local.outer"),
    ("local.outer_lr=0", "local.outer_lr"), ("local.outer_momentum=1.0", "local.outer_momentum")])
def test_bad_local_settings_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config("digits", ["strategy=local_sgd", override])
