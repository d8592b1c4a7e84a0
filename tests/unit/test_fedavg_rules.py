"""FedAvg's pure rules: the seeded Dirichlet split, the rounds' client samples, the weighted
mean in closed form."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from hvd_trainer.config import ConfigError, load_config
from hvd_trainer.strategies.fedavg.partition import clients_per_round, dealt, partition, sampled, weighted_mean
from hvd_trainer.strategies.fedavg.rounds import ClientRounds

pytestmark = pytest.mark.unit

LABELS = np.random.default_rng(0).integers(0, 10, size=3000)


@pytest.mark.parametrize("alpha", [None, 0.1, 1.0, 100.0])
def test_every_sample_belongs_to_one_client_and_the_split_is_seeded(alpha):
    parts = partition(LABELS, 20, alpha, seed=3)
    assert len(parts) == 20
    everything = np.concatenate(parts)
    assert len(everything) == len(LABELS) and set(everything.tolist()) == set(range(len(LABELS)))
    again = partition(LABELS, 20, alpha, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    other = partition(LABELS, 20, alpha, seed=4)
    assert any(not np.array_equal(a, b) for a, b in zip(parts, other))


def _label_skew(parts):
    """Mean over clients of the total-variation distance between a client's label mix and the
    whole set's."""
    whole = np.bincount(LABELS, minlength=10) / len(LABELS)
    dists = []
    for p in parts:
        if len(p):
            mix = np.bincount(LABELS[p], minlength=10) / len(p)
            dists.append(0.5 * np.abs(mix - whole).sum())
    return float(np.mean(dists))


def test_large_alpha_approaches_iid_and_small_alpha_is_skewed():
    skew = {a: _label_skew(partition(LABELS, 20, a, seed=1)) for a in (0.1, 1.0, 100.0, 1e5)}
    iid = _label_skew(partition(LABELS, 20, None, seed=1))
    assert skew[0.1] > skew[1.0] > skew[100.0] > skew[1e5]
    assert skew[0.1] > 0.5          # most of a client's labels are of a few classes
    assert skew[1e5] < 2 * iid + 0.02  # as close to the whole set's mix as an IID split


def test_a_round_samples_c_times_k_clients_seeded_and_deals_them_evenly():
    chosen = sampled(20, 0.3, seed=5, round_index=2)
    assert len(chosen) == clients_per_round(20, 0.3) == 6 and len(set(chosen)) == 6
    assert chosen == sampled(20, 0.3, seed=5, round_index=2)
    assert chosen != sampled(20, 0.3, seed=5, round_index=3)
    per_rank = [dealt(chosen, r, 4) for r in range(4)]
    assert all(len(p) == 2 for p in per_rank)  # padded: every rank takes the same steps
    assert sorted(k for p in per_rank for k in p if k is not None) == chosen
    assert clients_per_round(3, 0.01) == 1


def test_the_weighted_mean_in_closed_form():
    w = [np.array([1.0, 2.0]), np.array([3.0, -1.0]), np.array([0.5, 0.5])]
    n = [10, 30, 60]
    total = sum(k * v for k, v in zip(n, w))
    expected = (10 * w[0] + 30 * w[1] + 60 * w[2]) / 100
    np.testing.assert_allclose(weighted_mean(total, 100.0, np.zeros(2)), expected)
    assert np.array_equal(weighted_mean(np.zeros(2), 0.0, np.ones(2)), np.ones(2))  # no data: keep


def test_client_rounds_give_every_rank_the_same_steps_and_the_clients_data():
    x = torch.arange(200, dtype=torch.float32).reshape(100, 2)
    y = torch.as_tensor(np.random.default_rng(1).integers(0, 4, size=100))
    ds = TensorDataset(x, y)
    ranks = [ClientRounds(ds, 7, 0.5, 0.5, seed=2, rank=r, ranks=3) for r in range(3)]
    assert len({len(r) for r in ranks}) == 1
    seen = []
    for r in ranks:
        for client, xb, yb in r.epoch(0):
            if int(client) >= 0:
                idx = torch.as_tensor(r.parts[int(client)])
                assert torch.equal(xb, x[idx]) and torch.equal(yb, y[idx])
                seen.append(int(client))
    assert sorted(seen) == sampled(7, 0.5, 2, 0)
    skip = list(ranks[0].epoch(0, skip=1))
    assert len(skip) == len(ranks[0]) - 1


@pytest.mark.parametrize("override,key", [("fedavg.fraction=0", "fedavg.fraction"),
                                          ("fedavg.alpha=0", "fedavg.alpha"),
                                          ("fedavg.local_epochs=0", "fedavg.local_epochs"),
                                          ("fedavg.mu=-1", "fedavg.mu")])
def test_bad_fedavg_settings_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config("digits", ["strategy=fedavg", override])


@pytest.mark.parametrize("override,world,message", [
    ("fedavg.clients=2", 3, "fedavg.clients: 2 clients for 3 ranks"),
    ("optim.accumulation_steps=2", 2, "optim.accumulation_steps: must be 1"),
    ("model.sync_batchnorm=true", 2, "model.sync_batchnorm: not supported with strategy fedavg")])
def test_what_fedavg_cannot_run_is_refused_before_any_collective(override, world, message):
    from hvd_trainer.strategies import strategy_class

    cfg = load_config("digits", ["strategy=fedavg", override])
    with pytest.raises(ConfigError, match=message):
        strategy_class("fedavg").check(cfg, world)
