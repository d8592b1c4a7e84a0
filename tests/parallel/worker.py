"""Test worker: train through the Python API, then save this rank's final weights.

    mpirun -np 2 python tests/parallel/worker.py KEY=VALUE ...

``test.fail_rank=R test.fail_step=S`` (consumed here, not trainer config) makes rank R raise
inside its loss at step S, to check that a failing rank brings the job down.
"""
import sys

import torch

from hvd_trainer import load_config, train
from hvd_trainer.launch_env import launcher_rank
from hvd_trainer.strategies.base import unwrap

args = [a for a in sys.argv[1:] if not a.startswith("test.")]
test_opts = dict(a[len("test."):].split("=", 1) for a in sys.argv[1:] if a.startswith("test."))
cfg = load_config(None, args)
rank = launcher_rank()

loss_fn = torch.nn.functional.cross_entropy
if "fail_rank" in test_opts:
    calls = {"n": 0}
    fail_rank, fail_step = int(test_opts["fail_rank"]), int(test_opts["fail_step"])

    def failing_loss(logits, y):
        calls["n"] += 1
        if rank == fail_rank and calls["n"] == fail_step:
            raise RuntimeError(f"injected failure on rank {fail_rank}")
        return torch.nn.functional.cross_entropy(logits, y)

    loss_fn = failing_loss


def save_final_weights(trainer):
    state = {k: v.detach().clone() for k, v in unwrap(trainer.state.model).state_dict().items()}
    torch.save(state, f"{cfg.run_dir}/params_rank{trainer.strategy.rank}.pt")


train(cfg, loss_fn=loss_fn, on_end=save_final_weights)
