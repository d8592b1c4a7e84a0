"""FedAvg under real mpirun: one round of full-batch clients is one step of gradient descent on
the whole set; a run stopped between two clients of a round resumes bit-identical."""
from __future__ import annotations

from conftest import assert_resumed, assert_same, summary, train_local, train_params, train_run

BASE = ["data.name=digits", "model.name=mlp", "model.hidden=[32]", "optim.name=sgd", "optim.lr=0.1",
        "optim.momentum=0", "optim.lr_scaling=none", "optim.warmup_epochs=0", "optim.schedule=constant",
        "checkpoint.every_epochs=0", "checkpoint.resume=never", "epochs=3"]


def test_a_round_of_full_batch_clients_is_one_gradient_step_on_the_whole_set(tmp_path):
    # 2 IID clients of 719 samples, both in every round, one local step each over all their data:
    # the mean weighted by n_k of their steps is the full-batch gradient step (the loop's one
    # process at batch 1438, one step an epoch)
    fed = train_params(2, tmp_path / "fed", BASE + ["strategy=fedavg", "fedavg.clients=2", "fedavg.fraction=1",
                                                     "fedavg.local_epochs=1", "batch_size=1438"])
    one = train_local(tmp_path / "one", BASE + ["batch_size=1438"])
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
