"""Building what the loop runs on: the run's data (this rank's shard, its batches), the model,
the optimizer and lr schedule wrapped by the strategy, and evaluation. Everything here is built
identically on every training rank from the same config and seed."""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from .config import ConfigError, TrainConfig
from .data import (bad_sample_report, bind_rank_local, build_splits, check_finite, data_summary, eval_batches,
                   eval_loader, make_batches)
from .execution import LossFn
from .models import build_model
from .runtime.rng import seed_rank
from .schedule import build_optimizer, build_scheduler, scaled_lr
from .state import TrainState
from .strategies.base import StepPlan, Strategy


class RunData:
    """The training and held-out sets, this rank's training batches and its held-out slice."""

    def __init__(self, cfg: TrainConfig, strategy: Strategy, train: Optional[Dataset] = None,
                 test: Optional[Dataset] = None) -> None:
        self.cfg, self.strategy = cfg, strategy
        self.input_shape: Optional[tuple[int, ...]] = None
        self.num_classes = 0
        info = {}
        if train is None or test is None:
            splits = build_splits(cfg.data, cfg.seed)
            train, test = splits.train, splits.test
            self.input_shape, self.num_classes, info = splits.input_shape, splits.num_classes, splits.info
        # rank-local data sets (shards): each rank opens its own part; one small allgather
        bind_rank_local((train, test), strategy.dp_rank, strategy.dp_size, strategy.allgather_object)
        check_finite(train, "train_data")
        check_finite(test, "test_data")
        self.train, self.test = train, test
        self.info = {**data_summary(train, test, cfg.data), **info}
        self._eval_loader = None
        self.batches = None  # shard() deals them, once the model is built

    def shard(self) -> None:
        """This rank's batches for the ranks there are now (again after Horovod elastic resized)."""
        cfg, s = self.cfg, self.strategy
        if self.batches is not None:
            if getattr(self.train, "rank_local", False):  # its files were dealt to the old ranks
                raise ConfigError("data.name: shards cannot be re-dealt to a changed number of ranks (elastic)")
            self.close()
        self.batches = s.training_batches(self.train, cfg)
        if self.batches is None:
            self.batches = make_batches(self.train, cfg.batch_size, s.dp_rank, s.dp_size, cfg.seed, cfg.data, s.device)
        k = cfg.optim.accumulation_steps
        self.steps_per_epoch = len(self.batches) // k  # a trailing group of < k micro-batches is dropped
        if self.steps_per_epoch == 0:  # the same verdict on every rank
            raise ConfigError(f"batch_size: {cfg.batch_size} x accumulation {k} leaves no full step "
                              f"in a shard of {self.batches.sampler.num_samples} samples")

    def shape_and_classes(self) -> tuple[tuple[int, ...], int]:
        if self.input_shape is not None and self.num_classes:
            return self.input_shape, self.num_classes
        ds, test = self.train, self.test
        if hasattr(ds, "num_classes") and hasattr(ds, "input_shape"):  # no scan of every label
            return tuple(ds.input_shape), max(int(ds.num_classes), int(getattr(test, "num_classes", 0)))
        x0, _ = ds[0]
        labels = ds.tensors[1] if hasattr(ds, "tensors") else torch.tensor([int(ds[i][1]) for i in range(len(ds))])
        return tuple(x0.shape), int(labels.max()) + 1

    def eval_batches(self, batch_size: int):
        """This rank's held-out batches: a slice of shared tensors, all of a rank-local set, or a
        slice through loader workers (built once)."""
        s, ds = self.strategy, self.test
        if isinstance(ds, TensorDataset):
            local = getattr(ds, "rank_local", False)
            return eval_batches(ds, batch_size, 0 if local else s.dp_rank, 1 if local else s.dp_size)
        if self._eval_loader is None:
            self._eval_loader = eval_loader(ds, batch_size, s.dp_rank, s.dp_size, self.cfg.data, s.device, self.cfg.seed)
        return (tuple(b) for b in self._eval_loader)

    def global_len(self, which: str) -> int:
        """Samples over all ranks (a rank-local data set holds only this rank's)."""
        ds = getattr(self, which)
        return int(getattr(ds, "global_len", len(ds)))

    def bad_samples(self) -> dict[str, Any]:
        """Collective: the samples skipped as unreadable on every rank (``data.bad_samples=skip``)."""
        mine = [p for pipe in (self.batches, self._eval_loader) if pipe is not None for p in pipe.bad_samples()]
        return bad_sample_report(self.strategy.allgather_object(mine))

    def close(self) -> None:
        """Loader workers end with the run (or the shard), not at garbage collection."""
        for pipe in (self.batches, self._eval_loader):
            close = getattr(pipe, "close", None)  # in-memory batches start no workers
            if close is not None:
                close()


def build_state(cfg: TrainConfig, strategy: Strategy, model: nn.Module, steps_per_epoch: int) -> TrainState:
    """The model on the device, its optimizer, the strategy's wrapping and the lr schedule."""
    s = strategy
    if cfg.model.sync_batchnorm:
        model = s.sync_batchnorm(model)
    model = s.executor.stage_of(model).to(s.device)  # a pipeline stage keeps only its blocks
    optimizer = build_optimizer(model.parameters(), cfg.optim, s.lr_ranks)
    plan = StepPlan(cfg.optim.accumulation_steps, steps_per_epoch, cfg.epochs)
    model, optimizer = s.prepare(model, optimizer, plan)
    scheduler = build_scheduler(optimizer, cfg.optim, s.lr_ranks, steps_per_epoch, cfg.epochs)
    return TrainState(model, optimizer, scheduler, s, cfg.to_dict())


def build_model_for(cfg: TrainConfig, data: RunData, strategy: Strategy, model: Optional[nn.Module]) -> nn.Module:
    """The given model, or the configured one; initial weights are the same on every rank, and
    each rank then gets its own random stream (dropout)."""
    torch.manual_seed(cfg.seed)
    if model is None:
        model = build_model(cfg.model, *data.shape_and_classes())
    seed_rank(cfg.seed, strategy.dp_rank)
    return model


def scale_lr(st: TrainState, cfg: TrainConfig, strategy: Strategy) -> None:
    """The lr schedule's base for the ranks there are now (after Horovod elastic resized)."""
    sched = st.scheduler
    sched.base_lrs = [scaled_lr(cfg.optim, strategy.lr_ranks) for _ in sched.base_lrs]


class Evaluator:
    """Each rank scores a disjoint, unpadded slice; the sums count every sample once. Loss and
    accuracy are per target (per token for a language model's (B, T) targets)."""

    def __init__(self, cfg: TrainConfig, strategy: Strategy, data: RunData, loss_fn: LossFn) -> None:
        self.cfg, self.strategy, self.data, self.loss_fn = cfg, strategy, data, loss_fn

    @torch.no_grad()
    def evaluate(self, model: nn.Module, to_device: Callable) -> dict[str, float]:
        s = self.strategy
        if not self.cfg.model.sync_batchnorm:
            s.broadcast_buffers(model)
        model.eval()
        sums = torch.zeros(4, dtype=torch.float64)
        for batch in self.data.eval_batches(max(256, self.cfg.batch_size)):
            x, y = to_device(batch)
            logits = s.executor.infer(model, x, s.precision)
            if logits is None:  # a pipeline stage before the last: the last one scores
                continue
            logits = logits.float()
            sums += torch.tensor([float(self.loss_fn(logits, y)) * y.numel(), float((logits.argmax(1) == y).sum()),
                                  float(y.numel()), float(len(y))], dtype=torch.float64)
        model.train()
        total = s.allreduce(sums, op="sum")
        out = {"test_loss": float(total[0] / total[2]), "test_accuracy": float(total[1] / total[2]),
               "test_samples": int(total[3])}
        if self.cfg.data.name == "text":
            out["test_perplexity"] = float(torch.tensor(out["test_loss"], dtype=torch.float64).exp())
        return out
