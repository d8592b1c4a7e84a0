"""TensorBoard sink (rank 0 only): each epoch record as scalars at its global step, the loss and
learning rate of every step, and the run's config with its final metrics as hparams.

Layout of ``log_dir``: the scalars' event files directly in it; the hparams session in
``log_dir/hparams/`` (its own TensorBoard run, rewritten at every close).

Resume: a run resumed from a checkpoint at step ``resume_step`` (0: from scratch) appends a new
event file to the same directory. Its first event is a SessionLog.START at ``resume_step + 1`` (SummaryWriter's
``purge_step``), which tells TensorBoard's reader to drop every event already read with a step
``>= resume_step + 1``: the steps the crashed run trained past and the resumed run repeats.
"""
from __future__ import annotations

import glob
import math
import os
from typing import Any, Optional

from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams

from .phases import STEP_PARTS

# the times of "time" and of each rank's entry: the step, its parts, the epoch's evaluation
PARTS = ("step",) + STEP_PARTS + ("eval",)
FINAL_METRICS = ("final_test_accuracy", "final_test_loss", "samples_per_sec")
HPARAMS_DIR = "hparams"


def flatten(config: dict, prefix: str = "") -> dict:
    """``{"optim": {"lr": 0.1}}`` -> ``{"optim.lr": 0.1}``; values that are not int/float/str/bool
    (None, lists, paths) become their ``str``, since the hparams plugin holds nothing else."""
    flat: dict = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "."))
        elif isinstance(value, (bool, int, float, str)):
            flat[name] = value
        else:
            flat[name] = str(value)
    return flat


def _number(value: Any) -> Optional[float]:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


class TensorBoardSink:
    """Writes TensorBoard event files under ``log_dir``. Rank 0 only; no communication.

    ``resume_step`` is the global step of the checkpoint the run resumed from (0 for a fresh
    run); events at later steps left by an earlier run in ``log_dir`` are hidden from readers.
    """

    def __init__(self, log_dir: str, resume_step: int = 0):
        self.log_dir = str(log_dir)
        # a big queue so that step() never waits for the writer thread's disk writes;
        # flush_secs keeps what is on disk at most that stale for a live TensorBoard
        # purge always, also from 0: a run restarted from scratch in the same dir hides all of
        # the earlier attempt (steps are 1-based)
        self._writer = SummaryWriter(self.log_dir, purge_step=resume_step + 1, max_queue=1000, flush_secs=30)
        self._last_step = resume_step
        self._lr_step: Optional[int] = None  # the last step whose lr step() wrote
        self._last_record: dict = {}

    def step(self, step: int, loss: float, lr: float) -> None:
        """Every optimizer step: two scalars on the writer's queue (no flush, no disk I/O here)."""
        self._writer.add_scalar("train/step_loss", loss, step)
        self._writer.add_scalar("lr", lr, step)
        self._lr_step = self._last_step = step

    def epoch(self, record: dict) -> None:
        step = int(record["step"])
        self._last_step = max(self._last_step, step)
        self._last_record = record
        scalars = {"train/loss": record.get("train_loss"), "test/loss": record.get("test_loss"),
                   "test/accuracy": record.get("test_accuracy"),
                   "throughput/samples_per_sec": record.get("samples_per_sec"),
                   "throughput/epoch_samples_per_sec": record.get("epoch_samples_per_sec")}
        if self._lr_step != step:  # step() already wrote this step's lr: one value per step
            scalars["lr"] = record.get("lr")
        for part in PARTS:
            scalars[f"time/{part}_ms"] = _ms((record.get("time") or {}).get(f"{part}_s"))
        for entry in record.get("ranks") or []:
            prefix = f"rank{entry.get('rank')}"
            for part in PARTS:
                scalars[f"time/{prefix}/{part}_ms"] = _ms(entry.get(f"{part}_s"))
            for key in ("rss_mb", "peak_rss_mb", "gpu_mb", "gpu_peak_mb"):
                scalars[f"memory/{prefix}/{key}"] = entry.get(key)
            scalars[f"cpu/{prefix}/util"] = entry.get("cpu_util")
        for tag, value in scalars.items():
            value = _number(value)
            if value is not None:  # absent in older rows, null off CUDA
                self._writer.add_scalar(tag, value, step)
        self._writer.flush()  # once an epoch: a live TensorBoard sees each epoch when it ends

    def close(self, summary: dict, config: dict) -> None:
        """Write the hparams session (config and final metrics) and close the writer. Also called
        when a run stops early, possibly with ``summary == {}``: the last epoch's values stand in."""
        try:
            self._write_hparams(summary or {}, config or {})
        finally:
            self._writer.close()

    def _write_hparams(self, summary: dict, config: dict) -> None:
        last = self._last_record
        fallback = {"final_test_accuracy": last.get("test_accuracy"), "final_test_loss": last.get("test_loss"),
                    "samples_per_sec": last.get("samples_per_sec")}
        metrics = {}
        for key in FINAL_METRICS:
            value = _number(summary.get(key, fallback[key]))
            if value is not None:
                metrics[f"hparam/{key}"] = value
        directory = os.path.join(self.log_dir, HPARAMS_DIR)
        # The reader keeps the FIRST hparams metadata of a run, so an earlier run's session
        # (older config, rolled-back metrics) must go: write the new one, then delete the old.
        old = glob.glob(os.path.join(directory, "events.out.tfevents.*"))
        experiment, start, end = hparams(flatten(config), metrics)
        with SummaryWriter(directory) as writer:
            for proto in (experiment, start, end):
                writer.file_writer.add_summary(proto, self._last_step)
            for tag, value in metrics.items():
                writer.add_scalar(tag, value, self._last_step)
        for path in old:
            os.remove(path)


def _ms(seconds: Any) -> Optional[float]:
    value = _number(seconds)
    return None if value is None else value * 1000.0
