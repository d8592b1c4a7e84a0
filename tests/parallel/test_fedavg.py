"""FedAvg under real mpirun: one round of full-batch clients is one step of gradient descent on
the whole set; a run stopped between two clients of a round resumes bit-identical."""
from __future__ import annotations

from conftest import assert_resumed, assert_same, summary, train_local, train_params, train_run

BASE = ["data.name=digits", "model.name=mlp", "model.hidden=[32]", "optim.name=sgd", "optim.lr=0.1",
        "optim.momentum=0", "optim.lr_scaling=none", "optim.warmup_epochs=0", "optim.schedule=constant",
        "checkpoint.every_epochs=0", "checkpoint.resume=never", "epochs=3"]


def test_a_round_of_full_batch_clients_is_one_gradient_step_on_the_whole_set(tmp_path):
    # 4 non-IID clients of unequal size, all in every round, one local step each over all their
    # data: sum_k n_k (w - lr g_k) / n = w - lr * (the whole set's gradient), for any split, if and
    # only if the mean is weighted by n_k. The reference: one process at batch 1438 (the whole
    # training set), one step an epoch.
    fed = train_params(2, tmp_path / "fed", BASE + ["strategy=fedavg", "fedavg.clients=4", "fedavg.alpha=0.3",
                                                     "fedavg.fraction=1", "fedavg.local_epochs=1", "batch_size=1438"])
    one = train_local(tmp_path / "one", BASE + ["batch_size=1438"])
    sizes = summary(tmp_path / "fed")["clients"]["sizes"]
    assert max(sizes) > 1.5 * min(sizes), sizes  # unequal: an unweighted mean would differ
    assert_same(fed[0], fed[1], exact=True)
    assert_same(fed[0], one)


def test_a_stop_between_two_clients_of_a_round_resumes_exactly(tmp_path):
    # 5 non-IID clients, 3 a round over 2 ranks: one rank pads its second step; FedProx on
    args = BASE + ["strategy=fedavg", "fedavg.clients=5", "fedavg.fraction=0.6", "fedavg.local_epochs=2",
                   "fedavg.alpha=0.5", "fedavg.mu=0.01", "batch_size=32"]
    whole = train_params(2, tmp_path / "whole", args)
    assert_same(whole[0], whole[1], exact=True)  # every rank holds the global model after a round
    s = summary(tmp_path / "whole")
    assert s["rounds"] == 3 and s["steps"] == 6 and s["bytes_sent_per_rank"] > 0
    assert sum(s["clients"]["sizes"]) == 1438 and len(s["clients"]["label_counts"]) == 5

    run = tmp_path / "stopped"
    train_params(2, run, args + ["max_steps=3"])  # the first client of round 2
    resumed, res = train_run(2, run, args + ["checkpoint.resume=auto"])
    assert_resumed(res.stdout, run, 3)
    for r in range(2):
        assert_same(resumed[r], whole[r], exact=True)
    assert summary(run)["rounds"] == 3
