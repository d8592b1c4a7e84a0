"""Test driver: ``hvd-tune`` with every trial's steps slowed down, to act on a study while its
trials train.

    mpirun -np 2 python tests/parallel/tune_driver.py STUDY.yaml [KEY=VALUE ...]

Environment (consumed here, not study or trainer config): ``TUNE_STEP_SLEEP=SECONDS`` sleeps in
every loss call while ``TUNE_PAUSE_FILE`` exists (always, if unset). The arithmetic is the same
as without the pause, so a paused study and one that never paused train the same weights.
"""
import os
import sys
import time

import torch

import hvd_trainer.runner as runner
from hvd_trainer.tune.cli import main

pause = float(os.environ.get("TUNE_STEP_SLEEP", "0"))
pause_file = os.environ.get("TUNE_PAUSE_FILE")
real_train = runner.train


def slow_loss(logits, y):
    if pause and (pause_file is None or os.path.exists(pause_file)):
        time.sleep(pause)
    return torch.nn.functional.cross_entropy(logits, y)


def train(cfg, **kwargs):
    kwargs.setdefault("loss_fn", slow_loss)
    return real_train(cfg, **kwargs)


runner.train = train
sys.exit(main(sys.argv[1:]))
