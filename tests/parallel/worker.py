"""Test worker: train through the Python API, then save this rank's final weights.

    mpirun -np 2 python tests/parallel/worker.py KEY=VALUE ...

``test.fail_rank=R test.fail_step=S`` (consumed here, not trainer config) makes rank R raise
inside its loss at step S, to check that a failing rank brings the job down;
``test.nan_rank=R test.nan_steps=S1,S2`` makes rank R's loss NaN at those loss calls;
``test.step_sleep=SECONDS`` slows every loss call down (with ``test.pause_file=PATH``, only while
PATH exists: a test deletes it to let the rest of the run go at full speed);
``test.straggler=R:MS`` slows rank R's down by MS milliseconds (a straggler for the parameter
server's rules); ``test.data_sleep=R:MS`` makes rank R wait MS milliseconds for each training
batch (a slow data path, for the monitor's straggler warning); ``test.preimport=M1,M2`` imports
those modules before training (torch imports ``torch._dynamo``, over a second of work, inside
the first optimizer's construction: a rank silent that long at startup, for tests that time
peers' silence).
"""
import importlib
import sys

import torch

from hvd_trainer import load_config, train
from hvd_trainer.runtime.launch_env import launcher_rank
from hvd_trainer.strategies.base import unwrap

args = [a for a in sys.argv[1:] if not a.startswith("test.")]
test_opts = dict(a[len("test."):].split("=", 1) for a in sys.argv[1:] if a.startswith("test."))
cfg = load_config(None, args)
rank = launcher_rank()
for module in filter(None, test_opts.get("preimport", "").split(",")):
    importlib.import_module(module)

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
if "nan_rank" in test_opts:
    calls = {"n": 0}
    nan_rank, nan_steps = int(test_opts["nan_rank"]), {int(v) for v in test_opts["nan_steps"].split(",")}

    def nan_loss(logits, y):
        calls["n"] += 1
        loss = torch.nn.functional.cross_entropy(logits, y)
        return loss * float("nan") if rank == nan_rank and calls["n"] in nan_steps else loss

    loss_fn = nan_loss

if "step_sleep" in test_opts:  # slow every step down, to act on the job while it trains
    import os
    import time

    pause, inner = float(test_opts["step_sleep"]), loss_fn
    pause_file = test_opts.get("pause_file")

    def slow_loss(logits, y):
        if pause_file is None or os.path.exists(pause_file):
            time.sleep(pause)
        return inner(logits, y)

    loss_fn = slow_loss


def delay_on_this_rank(key: str) -> float:
    """``test.KEY=R:MS``: MS milliseconds (in seconds) on rank R, 0 elsewhere or unset."""
    if key not in test_opts:
        return 0.0
    slow_rank, slow_ms = test_opts[key].split(":")
    return float(slow_ms) / 1000.0 if rank == int(slow_rank) else 0.0


if delay_on_this_rank("straggler"):
    import time

    delay, plain = delay_on_this_rank("straggler"), loss_fn

    def straggling_loss(logits, y):
        if torch.is_grad_enabled():  # training steps, not evaluation
            time.sleep(delay)
        return plain(logits, y)

    loss_fn = straggling_loss

if delay_on_this_rank("data_sleep"):
    import time

    import hvd_trainer.components as components

    pause_batch, make = delay_on_this_rank("data_sleep"), components.make_batches

    def slow_batches(*a, **kw):
        batches = make(*a, **kw)
        epoch = batches.epoch

        def slow_epoch(*ea, **ekw):
            for batch in epoch(*ea, **ekw):
                time.sleep(pause_batch)
                yield batch

        batches.epoch = slow_epoch
        return batches

    components.make_batches = slow_batches


def save_final_weights(trainer):
    # the whole model's state, also on a pipeline stage (collective over its pipeline then)
    whole = trainer.strategy.executor.checkpoint_parts(unwrap(trainer.state.model), {})["model"]
    state = {k: v.detach().clone() for k, v in whole.items()}
    torch.save(state, f"{cfg.run_dir}/params_rank{trainer.strategy.rank}.pt")


train(cfg, loss_fn=loss_fn, on_end=save_final_weights)
