"""The training loop, the same for every strategy.

    restore (or broadcast rank 0's initial state) -> per epoch: train steps (checkpoint every N
    steps) -> evaluate -> metrics -> checkpoint -> summary.

Every method here is called by all ranks of the job; what must agree across ranks (config, seed,
data set) is built identically on each of them.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Optional

import torch
from torch import nn
from torch.utils.data import Dataset

from . import rng
from .checkpoint import Checkpointer
from .config import ConfigError, TrainConfig, check_world
from .data import ShardedBatches, build_splits, eval_batches, worker_seed_everything
from .models import build_model, count_parameters
from .output import Output
from .schedule import build_optimizer, build_scheduler, lr_scale
from .strategies import make_strategy
from .strategies.base import Strategy, torch_load_bytes


class TrainState:
    """Everything an exact resume needs, in one object with ``state_dict``/``load_state_dict``
    (the shape Horovod elastic's commit/restore and a signal-triggered checkpoint plug into)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler) -> None:
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.step = 0            # optimizer steps taken
        self.epoch = 0           # completed epochs
        self.batch_in_epoch = 0  # micro-batches consumed in the current epoch

    def counters(self) -> dict[str, int]:
        return {"step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch}

    def load_counters(self, payload: dict[str, Any]) -> None:
        self.step, self.epoch, self.batch_in_epoch = (int(payload[k]) for k in ("step", "epoch", "batch_in_epoch"))


class Trainer:
    """Build with a config (and optionally your own model, data sets and loss), then ``fit()``.

    ``model`` must be built identically on every rank (rank 0's weights are broadcast anyway);
    ``train_data``/``test_data`` must be the same data set on every rank (each rank takes its
    shard). ``loss_fn(outputs, targets)`` returns the batch-mean loss.
    """

    def __init__(self, cfg: TrainConfig, *, model: Optional[nn.Module] = None,
                 train_data: Optional[Dataset] = None, test_data: Optional[Dataset] = None,
                 loss_fn: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None,
                 strategy: Optional[Strategy] = None) -> None:
        self.t_start = time.perf_counter()
        self.cfg = cfg
        self.strategy = strategy or make_strategy(cfg)
        self.strategy.init()
        check_world(cfg, self.strategy.size)  # pure: every rank raises the same ConfigError
        s = self.strategy
        self.out = Output(cfg.run_dir, s.rank, cfg.runtime.progress, cfg.runtime.log_every_rank)
        self.loss_fn = loss_fn or nn.functional.cross_entropy

        splits = None
        if train_data is None or test_data is None:
            splits = build_splits(cfg.data, cfg.seed)
            train_data, test_data = splits.train, splits.test
        self.train_data, self.test_data = train_data, test_data
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        if model is None:
            shape, classes = (splits.input_shape, splits.num_classes) if splits else _shape_and_classes(train_data)
            model = build_model(cfg.model, shape, classes)
        if cfg.model.sync_batchnorm:
            model = s.sync_batchnorm(model)
        worker_seed_everything(cfg.seed, s.rank)  # per-rank streams (dropout)

        k = cfg.optim.accumulation_steps
        self.batches = ShardedBatches(train_data, cfg.batch_size, s.dp_rank, s.dp_size, cfg.seed,
                                      cfg.data.shuffle, cfg.data.drop_last)
        self.steps_per_epoch = len(self.batches) // k  # a trailing group of < k micro-batches is dropped
        if self.steps_per_epoch == 0:  # same verdict on every rank, servers included
            raise ConfigError(f"batch_size: {cfg.batch_size} x accumulation {k} leaves no full step "
                              f"in a shard of {self.batches.sampler.num_samples} samples")
        model = model.to(s.device)
        optimizer = build_optimizer(model.parameters(), cfg.optim, s.lr_ranks)
        self.n_params = count_parameters(model)
        model, optimizer = s.prepare(model, optimizer, k)
        scheduler = build_scheduler(optimizer, cfg.optim, s.lr_ranks, self.steps_per_epoch, cfg.epochs)
        self.state = TrainState(model, optimizer, scheduler)
        self.ckpt = Checkpointer(f"{cfg.run_dir}/checkpoints", cfg.checkpoint.keep)
        self.train_seconds = 0.0
        self.samples_seen = 0
        self.last_train_loss = float("nan")
        self.last_eval: dict[str, float] = {}
        self._stop = False
        self.epoch_done = False
        self.epoch_seconds: Optional[float] = None
        self.epoch_samples = 0

    # --- the loop ----------------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        self.restore()
        if not self.strategy.is_worker:  # a parameter server: serve until the workers finish
            self.strategy.serve(self)
            return {}
        self.print_plan()
        while self.state.epoch < self.cfg.epochs and not self._stop:
            self.train_epoch()
            self.evaluate()
            self.log_epoch()
            if self.epoch_done and self.cfg.checkpoint.every_epochs and self.state.epoch % self.cfg.checkpoint.every_epochs == 0:
                self.save()
        self.strategy.end_training()
        return self.finish()

    def train_epoch(self) -> None:
        st, cfg, k = self.state, self.cfg, self.cfg.optim.accumulation_steps
        first = st.batch_in_epoch // k
        bar = self.out.progress(self.steps_per_epoch, f"epoch {st.epoch + 1}/{cfg.epochs}", first)
        batches = self.batches.epoch(st.epoch, skip=st.batch_in_epoch)
        loss_sum, count = torch.zeros((), dtype=torch.float64), 0
        st.model.train()
        self.epoch_done = False
        trained_before = self.train_seconds
        t0 = time.perf_counter()
        for _ in range(first, self.steps_per_epoch):
            micro = [self._to_device(next(batches)) for _ in range(k)]
            loss = self.strategy.train_step(st.model, st.optimizer, micro, self.loss_fn, cfg.optim.grad_clip)
            st.scheduler.step()
            st.step += 1
            st.batch_in_epoch += k
            n = sum(len(m[-1]) for m in micro)
            loss_sum += loss.double() * n
            count += n
            bar.update(float(loss), count * self.strategy.dp_size / max(1e-9, time.perf_counter() - t0))
            if cfg.max_steps and st.step >= cfg.max_steps:
                self._stop = True
            if (cfg.checkpoint.every_steps and st.step % cfg.checkpoint.every_steps == 0) or self._stop:
                self.train_seconds += time.perf_counter() - t0
                self.save()
                t0 = time.perf_counter()
            if self._stop:
                break
        self.train_seconds += time.perf_counter() - t0
        self.epoch_seconds = self.train_seconds - trained_before if first == 0 and not self._stop else None
        bar.close()
        if st.batch_in_epoch >= self.steps_per_epoch * k:
            st.epoch += 1
            st.batch_in_epoch = 0
            self.epoch_done = True
        totals = self.strategy.allreduce_sum(torch.tensor([float(loss_sum), float(count)], dtype=torch.float64))
        self.samples_seen += int(totals[1])
        self.epoch_samples = int(totals[1])
        self.last_train_loss = float(totals[0] / max(1.0, float(totals[1])))

    def _to_device(self, batch):
        dev = self.strategy.device
        return batch if dev.type == "cpu" else tuple(t.to(dev, non_blocking=True) for t in batch)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Each worker scores a disjoint, unpadded slice; the sums count every sample once."""
        s, model = self.strategy, self.state.model
        if not self.cfg.model.sync_batchnorm:
            s.sync_buffers(model)
        model.eval()
        sums = torch.zeros(3, dtype=torch.float64)
        for batch in eval_batches(self.test_data, max(256, self.cfg.batch_size), s.dp_rank, s.dp_size):
            x, y = self._to_device(batch)
            logits = model(x)
            sums += torch.tensor([float(self.loss_fn(logits, y)) * len(y),
                                  float((logits.argmax(1) == y).sum()), float(len(y))], dtype=torch.float64)
        model.train()
        total = s.allreduce_sum(sums)
        self.last_eval = {"test_loss": float(total[0] / total[2]), "test_accuracy": float(total[1] / total[2]),
                          "test_samples": int(total[2])}
        return self.last_eval

    def log_epoch(self) -> None:
        st = self.state
        record = {"epoch": st.epoch, "step": st.step, "train_loss": self.last_train_loss,
                  "lr": st.optimizer.param_groups[0]["lr"], **self.last_eval,
                  "samples_per_sec": self.samples_seen / max(1e-9, self.train_seconds)}
        if self.epoch_seconds:  # an uninterrupted epoch: its own throughput, for benchmarks
            record["epoch_samples_per_sec"] = self.epoch_samples / self.epoch_seconds
        self.out.metrics(record)
        self.out.info(f"epoch {st.epoch:>3}  step {st.step:>6}  train_loss {self.last_train_loss:.4f}  "
                      f"test_loss {self.last_eval['test_loss']:.4f}  "
                      f"test_acc {100 * self.last_eval['test_accuracy']:.2f}%  "
                      f"{record['samples_per_sec']:.0f} samples/s")

    # --- state ---------------------------------------------------------------------------------------
    def save(self) -> None:
        """All workers call; rank 0 writes. BN buffers are rank 0's, RNG streams every rank's."""
        s, st = self.strategy, self.state
        if not self.cfg.model.sync_batchnorm:
            s.sync_buffers(st.model)
        rngs = s.allgather_object(rng.capture())
        payload = s.checkpoint_payload(st.model, st.optimizer)
        if s.rank == 0:
            path = self.ckpt.save({**payload, "scheduler": st.scheduler.state_dict(), **st.counters(),
                                   "rng": rngs, "config": self.cfg.to_dict(), "world_size": s.size,
                                   "strategy": s.name})
            self.out.log(f"checkpoint {path}")

    def restore(self) -> None:
        """Resume from rank 0's newest valid checkpoint (if any), then make every worker's
        parameters and optimizer state equal to rank 0's."""
        s, st = self.strategy, self.state
        found = self.ckpt.newest_valid() if (s.rank == 0 and self.cfg.checkpoint.resume == "auto") else None
        data = s.broadcast_bytes(found[1] if found else None)
        if data:
            payload = torch_load_bytes(data)
            s.load_payload(st.model, st.optimizer, payload)
            st.scheduler.load_state_dict(payload["scheduler"])
            st.load_counters(payload)
            if not s.is_worker:
                pass
            elif len(payload["rng"]) == s.dp_size:
                rng.restore(payload["rng"][s.dp_rank])
            else:
                self.out.info(f"note: checkpoint has {len(payload['rng'])} ranks' RNG streams, this run "
                              f"{s.dp_size}: random streams restart (weights and position are exact)")
            if found:
                self.out.info(f"resumed from {found[0]} at step {st.step} (epoch {st.epoch}, "
                              f"batch {st.batch_in_epoch})")
        s.broadcast_state(st.model, st.optimizer)

    # --- reporting ---------------------------------------------------------------------------------
    def global_batch_size(self) -> int:
        return self.cfg.batch_size * self.cfg.optim.accumulation_steps * self.strategy.dp_size

    def print_plan(self) -> None:
        s, c = self.strategy, self.cfg
        lr = c.optim.lr * lr_scale(c.optim.lr_scaling, s.lr_ranks)
        self.out.info(f"hvd-train: strategy={s.name} world_size={s.size} workers={s.dp_size} "
                      f"params={self.n_params:,} train={len(self.train_data)} test={len(self.test_data)}")
        self.out.info(f"  global_batch={self.global_batch_size()} (batch {c.batch_size} x accumulation "
                      f"{c.optim.accumulation_steps} x {s.dp_size} ranks)  steps/epoch={self.steps_per_epoch}  "
                      f"lr={c.optim.lr:g} -> {lr:g} ({c.optim.lr_scaling})  threads/rank={torch.get_num_threads()}")
        self.out.info("  " + "  ".join(f"{k}={v}" for k, v in s.settings().items()))

    def finish(self) -> dict[str, Any]:
        s, st = self.strategy, self.state
        summary = {
            "strategy": s.name, "world_size": s.size, "workers": s.dp_size, "epochs": st.epoch,
            "steps": st.step, "global_batch_size": self.global_batch_size(),
            "final_train_loss": self.last_train_loss,
            "final_test_loss": self.last_eval.get("test_loss"),
            "final_test_accuracy": self.last_eval.get("test_accuracy"),
            "samples_per_sec": self.samples_seen / max(1e-9, self.train_seconds),
            "train_seconds": self.train_seconds,
            "wall_seconds": time.perf_counter() - self.t_start,
            "parameters": self.n_params, "seed": self.cfg.seed,
            "lr": st.optimizer.param_groups[0]["lr"],
            "settings": s.settings(), **s.counters(),
        }
        self.out.summary(summary)
        self.out.info("summary: " + "  ".join(f"{k}={_fmt(summary[k])}" for k in (
            "strategy", "world_size", "epochs", "global_batch_size", "final_train_loss",
            "final_test_accuracy", "samples_per_sec", "wall_seconds")))
        return summary

    def close(self) -> None:
        """Close the output and drop the model and optimizer (a DDP wrapper holds the process
        group, which must not outlive the strategy's shutdown)."""
        self.out.close()
        self.state = None


def _shape_and_classes(dataset: Dataset) -> tuple[tuple[int, ...], int]:
    x0, _ = dataset[0]
    labels = dataset.tensors[1] if hasattr(dataset, "tensors") else torch.tensor([int(dataset[i][1]) for i in range(len(dataset))])
    return tuple(x0.shape), int(labels.max()) + 1


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def train(cfg: TrainConfig, **kwargs: Any) -> dict[str, Any]:
    """Build a Trainer, fit, shut communication down; returns the summary (empty on PS servers)."""
    trainer = Trainer(cfg, **kwargs)
    try:
        return trainer.fit()
    finally:
        trainer.close()
        trainer.strategy.shutdown()
