"""The training loop, the same for every strategy.

    restore -> per epoch: steps -> evaluate -> epoch row -> checkpoint -> summary.

The loop only sequences components that decide for themselves: the strategy (how a step runs
and how gradients are exchanged), the checkpoint manager (when to save, the resume protocol),
the non-finite guard, the reporter (rows, lines, summary) and the control plane (when to
stop). Every method is called by all training ranks of the job; ranks with another duty
(parameter servers) never build a Trainer.
"""
from __future__ import annotations

import copy
from typing import Any, Callable, Optional

import torch
from torch import nn
from torch.utils.data import Dataset

from .checkpointing import CheckpointManager, NonFiniteGuard
from .components import Evaluator, RunData, build_model_for, build_state, scale_lr
from .config import TrainConfig, check_agreement
from .execution import LossFn
from .models import count_parameters
from .monitor.monitor import Monitor
from .output import Output
from .parallel.stages import model_shapes
from .reporting import Reporter
from .runtime.control import ControlPlane, StopSignals
from .runtime.errors import Preempted
from .strategies.base import NonFiniteGradient, Strategy, unwrap

# after each epoch's evaluation, every training rank: why to stop here (the same on every
# rank), or None
EpochHook = Callable[["Trainer", dict[str, float]], Optional[str]]


class Trainer:
    """Build with a config and an initialised strategy (and optionally your own model, data sets
    and loss), then ``fit()``. Prefer :func:`hvd_trainer.runner.train`, which owns start and
    teardown. ``model`` must be built identically on every rank (rank 0's weights are broadcast
    anyway); the data sets must be the same on every rank (each takes its shard);
    ``loss_fn(outputs, targets)`` returns the batch-mean loss."""

    def __init__(self, cfg: TrainConfig, strategy: Strategy, *, model: Optional[nn.Module] = None,
                 train_data: Optional[Dataset] = None, test_data: Optional[Dataset] = None,
                 loss_fn: Optional[LossFn] = None, control: Optional[ControlPlane] = None,
                 on_epoch: Optional[EpochHook] = None) -> None:
        self.cfg, self.strategy = cfg, strategy
        self.control = control or ControlPlane(StopSignals(()))
        self.out = Output(cfg.run_dir, strategy.rank, cfg.runtime.progress, cfg.runtime.log_every_rank)
        self.monitor = Monitor(cfg, strategy, self.out)
        self.reporter = Reporter(cfg, strategy, self.out, self.monitor)
        self.loss_fn = loss_fn or nn.functional.cross_entropy
        self.data = RunData(cfg, strategy, train_data, test_data)
        model = build_model_for(cfg, self.data, strategy, model)
        self.n_params = count_parameters(model)
        self.data.shard()
        self.state = build_state(cfg, strategy, model, self.data.steps_per_epoch)
        self.checkpoints = CheckpointManager(cfg.checkpoint, cfg.run_dir, strategy, self.out, cfg.model.sync_batchnorm)
        self.guard = NonFiniteGuard(cfg.optim, self.out, self.checkpoints)
        self.evaluator = Evaluator(cfg, strategy, self.data, self.loss_fn)
        self.on_epoch = on_epoch
        self.stop_requested = self.preempted = False
        self.stopped_by: Optional[str] = None  # why the run ended before cfg.epochs, if it did

    @property
    def step(self) -> int:
        return self.state.step

    # --- the loop ------------------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        """Resume, train, summarize (every training rank); the strategy drives it."""
        return self.strategy.run(self)

    def restore(self, collective: bool = True) -> None:
        self.checkpoints.restore(self.state, self.cfg.checkpoint.resume, collective)

    def loop(self) -> dict[str, Any]:
        self._check_agreement()
        d = self.data
        self.reporter.plan(self.n_params, len(d.train), len(d.test), d.steps_per_epoch, d.info)
        self.monitor.open(self.checkpoints.resumed_step or 0)
        while self.state.epoch < self.cfg.epochs and not self.stop_requested:
            completed = self.train_epoch()
            if self.preempted:  # saved at the step; the time left before a SIGKILL is short
                self.strategy.barrier()  # no rank leaves before rank 0 has written
                raise Preempted(f"stopped by {self.control.reason} at step {self.state.step}; "
                                f"resume with checkpoint.resume=auto{self.checkpoints.last_good()}")
            with self.monitor.evaluating():
                evaluation = self.evaluator.evaluate(self.state.model, self._to_device)
            self.reporter.epoch_row(self.state, evaluation)
            if self.on_epoch is not None and (reason := self.on_epoch(self, evaluation)):
                self.stop_requested, self.stopped_by = True, reason
            self.checkpoints.after_epoch(self.state, completed)
            self.strategy.step_done(self.state.step, epoch_end=True)  # after the epoch's row is out
        self.checkpoints.at_end(self.state)
        extra = {"resumed_from_step": self.checkpoints.resumed_step, "bad_samples": d.bad_samples(),
                 "stopped_by": self.stopped_by}
        summary = self.reporter.summary(self.state, self.n_params, d.info, extra)
        self.monitor.close(summary)
        return summary

    def train_epoch(self) -> bool:
        """Train to the end of the epoch (or to a stop); whether the epoch completed."""
        st, cfg, k = self.state, self.cfg, self.cfg.optim.accumulation_steps
        first = st.batch_in_epoch // k
        steps = self.data.batches.batches_in(st.epoch_offset) // k  # fewer after the ranks changed
        batches = self.data.batches.epoch(st.epoch, skip=st.batch_in_epoch, offset=st.epoch_offset)
        meter = self.reporter.epoch_meter(steps, first, st.epoch)
        st.model.train()
        for _ in range(first, steps):
            self.monitor.step_begin(st.step + 1)
            micro = [self._to_device(next(batches)) for _ in range(k)]
            self.monitor.data_ready()
            loss = self._step(micro)
            meter.step(loss, micro)
            if cfg.max_steps and st.step >= cfg.max_steps:
                self.stop_requested = True
            if self.control.step_boundary(st.step):  # a stop signal: the same step on every rank
                self.stop_requested = self.preempted = True
            self.strategy.step_done(st.step)
            with meter.paused():
                self.checkpoints.after_step(st, self.stop_requested)
            self.monitor.step_end(st.step, loss, st.optimizer.param_groups[0]["lr"])
            if self.stop_requested:
                break
        self.reporter.end_epoch(meter, whole_epoch=first == 0 and not self.stop_requested)
        completed = st.batch_in_epoch >= steps * k
        if completed:
            st.epoch += 1
            st.batch_in_epoch = st.epoch_offset = 0
        return completed

    def _step(self, micro) -> Optional[torch.Tensor]:
        """One optimizer step; None when the guard skipped its update."""
        st, loss = self.state, None
        try:
            loss = self.strategy.train_step(st.model, st.optimizer, micro, self.loss_fn, self.cfg.optim.grad_clip)
        except NonFiniteGradient as err:
            m = self.reporter.metrics
            m.skipped_steps = self.guard.skip(err, st.step + 1, m.skipped_steps)
        st.scheduler.step()
        st.step += 1
        st.batch_in_epoch += len(micro)
        return loss

    def _to_device(self, batch):
        dev = self.strategy.device
        return batch if dev.type == "cpu" else tuple(t.to(dev, non_blocking=True) for t in batch)

    def _check_agreement(self) -> None:
        """What the config cannot show must agree too (a model or data set given through the
        Python API): one small collective, the same verdict on every rank."""
        view = {"model": model_shapes(unwrap(self.state.model)),
                "data": {"train_samples": self.data.global_len("train"), "test_samples": self.data.global_len("test"),
                         "steps_per_epoch": self.data.steps_per_epoch}}
        check_agreement(self.strategy.allgather_object(view), "model or data set")

    # --- Horovod elastic: in-memory commits, and ranks that come and go --------------------------------
    def snapshot(self) -> dict[str, Any]:
        return {"state": self.state.snapshot(), "metrics": copy.deepcopy(self.reporter.metrics)}

    def load_snapshot(self, snap: dict[str, Any]) -> None:
        self.state.load_snapshot(snap["state"])
        self.reporter.metrics = copy.deepcopy(snap["metrics"])
        self.out.forget_metrics_after(self.state.step)  # rows of the work rolled back
        scale_lr(self.state, self.cfg, self.strategy)

    def resize(self) -> None:
        """The ranks changed (the strategy knows its new rank and size): shard anew, rescale."""
        self.out.renumber(self.strategy.rank)
        self.data.shard()
        scale_lr(self.state, self.cfg, self.strategy)

    def close(self) -> None:
        """Close the output and drop the model and optimizer (a DDP wrapper holds the process
        group, which must not outlive the strategy's shutdown)."""
        self.monitor.close({})  # after a failure: release the sinks' files and port
        self.out.close()
        self.state = None
        self.data.close()
