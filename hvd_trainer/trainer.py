"""The training loop, the same for every strategy, and ``train()``, the one way in and out.

    restore (or broadcast rank 0's initial state) -> per epoch: train steps (checkpoint every N
    steps) -> evaluate -> metrics -> checkpoint -> summary.

Every Trainer method is called by all training ranks of the job; what must agree across ranks
(config, seed, data set) is built identically on each of them. Ranks with another duty (parameter
servers) never build a Trainer: ``train()`` sends them to their duty.
"""
from __future__ import annotations

import copy
import gc
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from .checkpoint import Checkpointer, torch_load_bytes
from .config import ConfigError, TrainConfig, check_agreement
from .data import build_splits, eval_batches, worker_seed_everything
from .datasets import bind_rank_local, data_summary
from .pipeline import eval_loader, is_fast_path, make_batches
from .precision import Precision
from .launch_env import abort_job, apply_mpi_defaults, launched_by_mpi
from .models import build_model, count_parameters
from .output import Output
from .schedule import build_optimizer, build_scheduler, lr_scale
from .state import TrainState
from .strategies import make_strategy
from .control import ControlPlane, MPIControlPlane, StopSignals, open_control_plane
from .errors import NonFiniteError, Preempted
from .strategies.base import NonFiniteGradient, StepPlan, Strategy, unwrap

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class RunMetrics:
    """What the run has measured so far (the summary and metrics.jsonl are made from it)."""

    train_seconds: float = 0.0
    samples_seen: int = 0
    last_train_loss: float = float("nan")
    last_eval: dict[str, float] = field(default_factory=dict)
    epoch_seconds: Optional[float] = None  # the last epoch's, when it ran uninterrupted
    epoch_samples: int = 0
    skipped_steps: int = 0  # updates not applied: non-finite gradient (optim.nonfinite=skip)

    @property
    def samples_per_sec(self) -> float:
        return self.samples_seen / max(1e-9, self.train_seconds)


class Trainer:
    """Build with a config and an initialised strategy (and optionally your own model, data sets
    and loss), then ``fit()``. Prefer :func:`train`, which also owns start and teardown.

    ``model`` must be built identically on every rank (rank 0's weights are broadcast anyway);
    ``train_data``/``test_data`` must be the same data set on every rank (each rank takes its
    shard). ``loss_fn(outputs, targets)`` returns the batch-mean loss.
    """

    def __init__(self, cfg: TrainConfig, strategy: Strategy, *, model: Optional[nn.Module] = None,
                 train_data: Optional[Dataset] = None, test_data: Optional[Dataset] = None,
                 loss_fn: Optional[LossFn] = None, control: Optional[ControlPlane] = None) -> None:
        self.t_start = time.perf_counter()
        self.cfg, self.strategy = cfg, strategy
        self.control = control or ControlPlane(StopSignals(()))
        self.preempted = False
        self.out = Output(cfg.run_dir, strategy.rank, cfg.runtime.progress, cfg.runtime.log_every_rank)
        self.loss_fn = loss_fn or nn.functional.cross_entropy
        self.metrics = RunMetrics()
        self.stop_requested = False
        self.saved_step: Optional[int] = None  # the step of the newest checkpoint of this run
        model = self._build_data(train_data, test_data, model)
        self._build_training(model)
        self.ckpt = Checkpointer(f"{cfg.run_dir}/checkpoints", cfg.checkpoint.keep)

    def _build_data(self, train_data, test_data, model) -> nn.Module:
        """Data sets, this rank's shard of the training set, and the model (if not given)."""
        cfg, s = self.cfg, self.strategy
        splits = None
        if train_data is None or test_data is None:
            splits = build_splits(cfg.data, cfg.seed)
            train_data, test_data = splits.train, splits.test
        # rank-local data sets (shards): each rank opens its own part; one small allgather
        bind_rank_local((train_data, test_data), s.dp_rank, s.dp_size, s.allgather_object)
        self.train_data, self.test_data = train_data, test_data
        self._eval_loader = None
        for name, ds in (("train_data", train_data), ("test_data", test_data)):
            if is_fast_path(ds) and any(t.is_floating_point() and not bool(torch.isfinite(t).all())
                                                     for t in ds.tensors):
                raise ConfigError(f"{name}: the data set holds NaN or infinity")
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        if model is None:
            shape, classes = (splits.input_shape, splits.num_classes) if splits and splits.num_classes \
                else _shape_and_classes(train_data, test_data)
            model = build_model(cfg.model, shape, classes)
        worker_seed_everything(cfg.seed, s.dp_rank)  # per-rank streams (dropout)
        k = cfg.optim.accumulation_steps
        self.batches = make_batches(train_data, cfg.batch_size, s.dp_rank, s.dp_size, cfg.seed, cfg.data, s.device)
        self.data_info = data_summary(train_data, test_data, cfg.data)
        self.steps_per_epoch = len(self.batches) // k  # a trailing group of < k micro-batches is dropped
        if self.steps_per_epoch == 0:  # the same verdict on every rank
            raise ConfigError(f"batch_size: {cfg.batch_size} x accumulation {k} leaves no full step "
                              f"in a shard of {self.batches.sampler.num_samples} samples")
        return model

    def _build_training(self, model: nn.Module) -> None:
        """Model on the device, optimizer, the strategy's wrapping, lr schedule, state."""
        cfg, s = self.cfg, self.strategy
        if cfg.model.sync_batchnorm:
            model = s.sync_batchnorm(model)
        model = model.to(s.device)
        s.precision = Precision(cfg.optim.precision, s.device)
        optimizer = build_optimizer(model.parameters(), cfg.optim, s.lr_ranks)
        self.n_params = count_parameters(model)
        plan = StepPlan(cfg.optim.accumulation_steps, self.steps_per_epoch, cfg.epochs)
        model, optimizer = s.prepare(model, optimizer, plan)
        scheduler = build_scheduler(optimizer, cfg.optim, s.lr_ranks, self.steps_per_epoch, cfg.epochs)
        self.state = TrainState(model, optimizer, scheduler, s, cfg.to_dict())

    def _check_agreement(self) -> None:
        """What the config cannot show must agree too (a model or data set given through the
        Python API): one small collective, the same verdict on every rank."""
        from .strategies.base import unwrap

        view = {"model": {name: list(t.shape) for name, t in unwrap(self.state.model).state_dict().items()},
                "data": {"train_samples": _global_len(self.train_data), "test_samples": _global_len(self.test_data),
                         "steps_per_epoch": self.steps_per_epoch}}
        check_agreement(self.strategy.allgather_object(view), "model or data set")

    # --- the loop ----------------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        """Resume, train, summarize (every training rank); the strategy drives it."""
        return self.strategy.run(self)

    def loop(self) -> dict[str, Any]:
        self._check_agreement()
        self.print_plan()
        while self.state.epoch < self.cfg.epochs and not self.stop_requested:
            completed = self.train_epoch()
            if self.preempted:  # saved at the step; the time left before a SIGKILL is short
                self.strategy.allreduce(torch.zeros(1))  # no rank leaves before rank 0 has written
                raise Preempted(f"stopped by {self.control.reason} at step {self.state.step}; "
                                f"resume with checkpoint.resume=auto{self._last_good()}")
            self.evaluate()
            self.log_epoch()
            every = self.cfg.checkpoint.every_epochs
            if completed and every and self.state.epoch % every == 0:
                self.save()
            self.strategy.step_done(self.state.step, epoch_end=True)  # after the epoch's row is out
        if self.saved_step != self.state.step:  # the trained model is always kept on disk
            self.save()
        return self.finish()

    def train_epoch(self) -> bool:
        """Train to the end of the epoch (or to max_steps); whether the epoch completed."""
        st, cfg, k, m = self.state, self.cfg, self.cfg.optim.accumulation_steps, self.metrics
        first = st.batch_in_epoch // k
        steps = self.batches.batches_in(st.epoch_offset) // k  # fewer after the ranks changed mid-epoch
        bar = self.out.progress(steps, f"epoch {st.epoch + 1}/{cfg.epochs}", first)
        batches = self.batches.epoch(st.epoch, skip=st.batch_in_epoch, offset=st.epoch_offset)
        loss_sum, count = torch.zeros((), dtype=torch.float64), 0
        st.model.train()
        trained_before = m.train_seconds
        t0 = time.perf_counter()
        for _ in range(first, steps):
            micro = [self._to_device(next(batches)) for _ in range(k)]
            try:
                loss = self.strategy.train_step(st.model, st.optimizer, micro, self.loss_fn, cfg.optim.grad_clip)
            except NonFiniteGradient as err:
                loss = self._skip_step(err)
            st.scheduler.step()
            st.step += 1
            st.batch_in_epoch += k
            n = sum(len(b[-1]) for b in micro)
            if loss is not None:
                loss_sum += loss.double() * n
                count += n
            bar.update(float(loss) if loss is not None else float("nan"), count * self.strategy.dp_size / max(1e-9, time.perf_counter() - t0))
            if cfg.max_steps and st.step >= cfg.max_steps:
                self.stop_requested = True
            if self.control.step_boundary(st.step):  # a stop signal: the same step on every rank
                self.stop_requested = self.preempted = True
            self.strategy.step_done(st.step)
            if (cfg.checkpoint.every_steps and st.step % cfg.checkpoint.every_steps == 0) or self.stop_requested:
                m.train_seconds += time.perf_counter() - t0
                self.save()
                t0 = time.perf_counter()
            if self.stop_requested:
                break
        m.train_seconds += time.perf_counter() - t0
        m.epoch_seconds = m.train_seconds - trained_before if first == 0 and not self.stop_requested else None
        bar.close()
        completed = st.batch_in_epoch >= steps * k
        if completed:
            st.epoch += 1
            st.batch_in_epoch = st.epoch_offset = 0
        totals = self.strategy.allreduce(torch.tensor([float(loss_sum), float(count)], dtype=torch.float64))
        m.samples_seen += int(totals[1])
        m.epoch_samples = int(totals[1])
        m.last_train_loss = float(totals[0] / max(1.0, float(totals[1])))
        return completed

    def _skip_step(self, err: NonFiniteGradient) -> None:
        """Every rank gets here at the same step (the verdict is on the averaged gradient)."""
        m, o = self.metrics, self.cfg.optim
        m.skipped_steps += 1
        where = f"step {self.state.step + 1}: non-finite gradient ({err})"
        if o.nonfinite == "stop":
            raise NonFiniteError(f"{where}; optim.nonfinite=stop{self._last_good()}")
        if m.skipped_steps > o.max_skipped_steps:
            raise NonFiniteError(f"{where}: {m.skipped_steps} skipped steps, more than "
                                 f"optim.max_skipped_steps={o.max_skipped_steps}{self._last_good()}")
        self.out.print(f"hvd-train: {where}: update skipped ({m.skipped_steps} of at most {o.max_skipped_steps})")
        return None

    def _last_good(self) -> str:
        newest = self.ckpt.list()[:1]
        return f"; the last good checkpoint is {newest[0]}" if newest else "; no checkpoint was written"

    def _to_device(self, batch):
        dev = self.strategy.device
        return batch if dev.type == "cpu" else tuple(t.to(dev, non_blocking=True) for t in batch)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Each rank scores a disjoint, unpadded slice; the sums count every sample once."""
        s, model = self.strategy, self.state.model
        if not self.cfg.model.sync_batchnorm:
            s.broadcast_buffers(model)
        model.eval()
        sums = torch.zeros(3, dtype=torch.float64)
        for batch in self._eval_batches(max(256, self.cfg.batch_size)):
            x, y = self._to_device(batch)
            with s.precision.autocast():
                logits = model(x).float()
            sums += torch.tensor([float(self.loss_fn(logits, y)) * len(y),
                                  float((logits.argmax(1) == y).sum()), float(len(y))], dtype=torch.float64)
        model.train()
        total = s.allreduce(sums)
        self.metrics.last_eval = {"test_loss": float(total[0] / total[2]),
                                  "test_accuracy": float(total[1] / total[2]), "test_samples": int(total[2])}
        return self.metrics.last_eval

    def _eval_batches(self, batch_size: int):
        """This rank's held-out batches: a slice of shared tensors, all of a rank-local set, or
        a slice through loader workers (built once)."""
        s, ds = self.strategy, self.test_data
        if isinstance(ds, TensorDataset):
            local = getattr(ds, "rank_local", False)
            return eval_batches(ds, batch_size, 0 if local else s.dp_rank, 1 if local else s.dp_size)
        if self._eval_loader is None:
            self._eval_loader = eval_loader(ds, batch_size, s.dp_rank, s.dp_size, self.cfg.data, s.device, self.cfg.seed)
        return (tuple(b) for b in self._eval_loader)

    def log_epoch(self) -> None:
        st, m = self.state, self.metrics
        record = {"epoch": st.epoch, "step": st.step, "train_loss": m.last_train_loss,
                  "lr": st.optimizer.param_groups[0]["lr"], **m.last_eval, "samples_per_sec": m.samples_per_sec,
                  "elapsed_s": time.perf_counter() - self.t_start}  # convergence against wall time
        if m.epoch_seconds:  # an uninterrupted epoch: its own throughput, for benchmarks
            record["epoch_samples_per_sec"] = m.epoch_samples / m.epoch_seconds
        self.out.metrics(record)
        self.out.print(f"epoch {st.epoch:>3}  step {st.step:>6}  train_loss {m.last_train_loss:.4f}  "
                       f"test_loss {m.last_eval['test_loss']:.4f}  "
                       f"test_acc {100 * m.last_eval['test_accuracy']:.2f}%  {m.samples_per_sec:.0f} samples/s")

    # --- state ---------------------------------------------------------------------------------------
    def save(self) -> None:
        """All training ranks call; rank 0 writes. BN buffers are rank 0's, RNG streams every rank's."""
        if not self.cfg.model.sync_batchnorm:
            self.strategy.broadcast_buffers(self.state.model)
        floats = [t for t in unwrap(self.state.model).state_dict().values() if t.is_floating_point()]
        if floats and not bool(torch.isfinite(torch.nn.utils.get_total_norm(floats))):
            # never let NaN weights replace good checkpoints (keep prunes the oldest)
            raise NonFiniteError(f"step {self.state.step}: the weights hold NaN or infinity; "
                                 f"refusing to checkpoint them{self._last_good()}")
        payload = self.state.state_dict()
        if self.strategy.rank == 0:
            self.out.log_rank(f"checkpoint {self.ckpt.save(payload)}")
        self.saved_step = self.state.step

    def restore(self, collective: bool = True) -> None:
        """Resume from rank 0's newest usable checkpoint (if any; every skipped one is reported),
        then make every rank's parameters and optimizer state equal to rank 0's. Not
        ``collective``: rank 0 alone loads it (Horovod elastic then syncs every rank to it)."""
        s, st = self.strategy, self.state
        message = None
        if s.rank == 0 and self.cfg.checkpoint.resume == "auto":
            found = self.ckpt.find()
            message = {"path": str(found.path) if found.path else None, "data": found.data,
                       "skipped": found.skipped, "unusable": found.unusable}
        if collective:
            message = s.broadcast_object(message)  # rank 0 reads; no shared file system needed
        if message is not None:
            for path, reason in message["skipped"]:
                self.out.print(f"hvd-train: skipped checkpoint {path}: {reason}")
            if message["unusable"]:
                raise ConfigError(f"checkpoint.resume: no usable checkpoint in {self.ckpt.dir} "
                                  f"({len(message['skipped'])} skipped, reasons above); refusing to start "
                                  f"over them: move them away or set checkpoint.resume=never")
            if message["data"] is not None:
                note = st.load_state_dict(torch_load_bytes(message["data"]))
                self.saved_step = st.step
                self.out.forget_metrics_after(st.step)
                if note:
                    self.out.print(f"note: {note}")
                self.out.print(f"resumed from {message['path']} at step {st.step} (epoch {st.epoch}, "
                               f"batch {st.batch_in_epoch})")
        if collective:
            s.broadcast_parameters(st.model)
            s.broadcast_optimizer_state(st.optimizer)

    # --- Horovod elastic: in-memory commits, and ranks that come and go ---------------------------------
    def snapshot(self) -> dict[str, Any]:
        """This rank's training state, copied (no communication): an elastic commit."""
        st = self.state
        return copy.deepcopy({"model": unwrap(st.model).state_dict(), "optimizer": st.optimizer.state_dict(),
                              "scheduler": st.scheduler.state_dict(), "step": st.step, "epoch": st.epoch,
                              "batch_in_epoch": st.batch_in_epoch, "epoch_offset": st.epoch_offset,
                              "dp_size": self.strategy.dp_size, "metrics": self.metrics})

    def load_snapshot(self, snap: dict[str, Any]) -> None:
        """Back to a commit (this rank's own, or rank 0's after a sync); the position is then
        re-expressed for the ranks there are now."""
        st, snap = self.state, copy.deepcopy(snap)
        unwrap(st.model).load_state_dict(snap["model"])
        st.optimizer.load_state_dict(snap["optimizer"])
        st.scheduler.load_state_dict(snap["scheduler"])
        st.step, st.epoch, st.batch_in_epoch, st.epoch_offset = (
            snap[k] for k in ("step", "epoch", "batch_in_epoch", "epoch_offset"))
        self.metrics = snap["metrics"]
        self.out.forget_metrics_after(st.step)  # rows of the work rolled back
        st.rebase(snap["dp_size"], self.strategy.dp_size)
        self._scale_lr()

    def resize(self) -> None:
        """The ranks changed (the strategy knows its new rank and size): shard the data anew and
        scale the lr for the new number of ranks."""
        cfg, s = self.cfg, self.strategy
        self.out.renumber(s.rank)
        if getattr(self.train_data, "rank_local", False):  # its files were dealt to the old ranks
            raise ConfigError("data.name: shards cannot be re-dealt to a changed number of ranks (elastic)")
        close = getattr(self.batches, "close", None)
        if close is not None:  # the old pipeline's workers
            close()
        self.batches = make_batches(self.train_data, cfg.batch_size, s.dp_rank, s.dp_size, cfg.seed, cfg.data, s.device)
        self.steps_per_epoch = len(self.batches) // cfg.optim.accumulation_steps
        self._scale_lr()

    def _scale_lr(self) -> None:
        o, sched = self.cfg.optim, self.state.scheduler
        sched.base_lrs = [o.lr * lr_scale(o.lr_scaling, self.strategy.lr_ranks) for _ in sched.base_lrs]

    # --- reporting ---------------------------------------------------------------------------------
    def global_batch_size(self) -> int:
        return self.cfg.batch_size * self.cfg.optim.accumulation_steps * self.strategy.dp_size

    def print_plan(self) -> None:
        s, c = self.strategy, self.cfg
        lr = c.optim.lr * lr_scale(c.optim.lr_scaling, s.lr_ranks)
        self.out.print(f"hvd-train: strategy={s.name} world_size={s.size} workers={s.dp_size} "
                       f"params={self.n_params:,} train={len(self.train_data)} test={len(self.test_data)}")
        self.out.print(f"  global_batch={self.global_batch_size()} (batch {c.batch_size} x accumulation "
                       f"{c.optim.accumulation_steps} x {s.dp_size} ranks)  steps/epoch={self.steps_per_epoch}  "
                       f"lr={c.optim.lr:g} -> {lr:g} ({c.optim.lr_scaling})  threads/rank={torch.get_num_threads()}")
        self.out.print(f"  precision={c.optim.precision}  recompute={str(c.model.recompute).lower()}  "
                       + "  ".join(f"data.{k}={v}" for k, v in self.data_info.items() if "shards" not in k))
        self.out.print("  " + "  ".join(f"{k}={v}" for k, v in s.settings().items()))

    def finish(self) -> dict[str, Any]:
        s, st, m = self.strategy, self.state, self.metrics
        summary = {
            "strategy": s.name, "world_size": s.size, "workers": s.dp_size, "epochs": st.epoch,
            "steps": st.step, "global_batch_size": self.global_batch_size(),
            "final_train_loss": m.last_train_loss,
            "final_test_loss": m.last_eval.get("test_loss"),
            "final_test_accuracy": m.last_eval.get("test_accuracy"),
            "samples_per_sec": m.samples_per_sec,
            "train_seconds": m.train_seconds,
            "wall_seconds": time.perf_counter() - self.t_start,
            "parameters": self.n_params, "seed": self.cfg.seed,
            "lr": st.optimizer.param_groups[0]["lr"],
            "skipped_steps": m.skipped_steps, "settings": s.settings(), **s.counters(),
            "precision": self.cfg.optim.precision, "fp16_overflow_steps": s.precision.overflow_steps,
            "recompute": self.cfg.model.recompute, "data": self.data_info,
        }
        self.out.summary(summary)
        self.out.print("summary: " + "  ".join(f"{k}={_fmt(summary[k])}" for k in (
            "strategy", "world_size", "epochs", "global_batch_size", "final_train_loss",
            "final_test_accuracy", "samples_per_sec", "wall_seconds")))
        return summary

    def close(self) -> None:
        """Close the output and drop the model and optimizer (a DDP wrapper holds the process
        group, which must not outlive the strategy's shutdown)."""
        self.out.close()
        self.state = None
        for pipe in (getattr(self, "batches", None), getattr(self, "_eval_loader", None)):
            close = getattr(pipe, "close", None) or getattr(getattr(pipe, "_iterator", None), "_shutdown_workers", None)
            if close is not None:  # loader workers end with the run, not at garbage collection
                close()


def _global_len(dataset: Dataset) -> int:
    """Samples over all ranks (a rank-local data set holds only this rank's)."""
    return int(getattr(dataset, "global_len", len(dataset)))


def _shape_and_classes(dataset: Dataset, test: Optional[Dataset] = None) -> tuple[tuple[int, ...], int]:
    if hasattr(dataset, "num_classes") and hasattr(dataset, "input_shape"):  # no scan of every label
        classes = max(int(dataset.num_classes), int(getattr(test, "num_classes", 0)))
        return tuple(dataset.input_shape), classes
    x0, _ = dataset[0]
    labels = dataset.tensors[1] if hasattr(dataset, "tensors") else torch.tensor([int(dataset[i][1]) for i in range(len(dataset))])
    return tuple(x0.shape), int(labels.max()) + 1


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _agree_on_config(cfg: TrainConfig) -> None:
    """Ranks launched with different configs (MPMD, a stale file on one node) would hang in
    mismatched collectives or train the wrong thing: compare them over plain MPI before any
    strategy starts. (Under horovodrun's Gloo controller the model/data check still runs.)"""
    if not launched_by_mpi():
        return
    from mpi4py import MPI

    check_agreement(MPI.COMM_WORLD.allgather(cfg.to_dict()), "config")


def train(cfg: TrainConfig, *, model: Optional[nn.Module] = None, train_data: Optional[Dataset] = None,
          test_data: Optional[Dataset] = None, loss_fn: Optional[LossFn] = None,
          on_end: Optional[Callable[[Trainer], Any]] = None) -> dict[str, Any]:
    """Run ``cfg`` on this rank: every rank of the job calls it. Returns the summary on rank 0
    (``{}`` on a parameter-server rank). ``on_end(trainer)`` runs on every training rank after
    the last step, before teardown (to save or inspect the final model).

    The one start and teardown path (the CLI, the Python API, tests and benchmarks all come
    here): MPI defaults before MPI starts; strategy up, checked, this rank's role; on success
    the trainer is closed and communication shut down; a config error (the same on every rank)
    is raised after an orderly shutdown; any other failure in a multi-rank job prints its
    traceback and takes the whole job down, so no rank waits for a dead peer.
    """
    apply_mpi_defaults()
    _agree_on_config(cfg)
    strategy = make_strategy(cfg)
    strategy.init()
    control: Optional[ControlPlane] = None

    def teardown(reason: Optional[str] = None) -> None:
        strategy.shutdown(reason=reason)
        if control is not None:  # after the strategy: a PS server finishes once the workers left
            control.close()

    try:
        type(strategy).check(cfg, strategy.size)
        duty = strategy.role()
        control = open_control_plane(size=strategy.size, is_training=duty is None,
                                     peer_timeout_s=cfg.runtime.peer_timeout_s,
                                     stop_signals=cfg.checkpoint.stop_signals, allreduce=strategy.allreduce)
        summary: dict[str, Any] = {}
        if duty is not None:
            duty()
        else:
            trainer = Trainer(cfg, strategy, model=model, train_data=train_data, test_data=test_data,
                              loss_fn=loss_fn, control=control)
            try:
                summary = trainer.fit()
                if on_end is not None:
                    on_end(trainer)
            finally:
                trainer.close()
                del trainer
                gc.collect()
    except ConfigError as err:
        teardown(reason=str(err))
        raise
    except Preempted as err:  # every training rank, at the same step, after the checkpoint
        if strategy.rank == 0:
            print(f"hvd-train: {err.message}; exiting {err.code}", file=sys.stderr, flush=True)
        teardown()
        raise
    except NonFiniteError as err:
        if strategy.size <= 1:
            raise
        print(f"hvd-train: rank {strategy.rank}: {err}", file=sys.stderr, flush=True)
        abort_job(1)
    except BaseException as err:  # noqa: BLE001 - one failing rank must end the job, not hang it
        if strategy.size <= 1 or (isinstance(err, SystemExit) and not err.code):
            raise
        sys.stdout.flush()
        lost = control.census() if isinstance(control, MPIControlPlane) else []
        if lost:  # a peer died or froze, and this rank's collective failed on it: name the cause
            print(f"hvd-train: {control.describe(strategy.rank)}: "
                  f"{', '.join(control.describe(r) for r in lost)} does not answer (killed, stopped, or "
                  f"its node is down); ending the job", file=sys.stderr)
        print(f"hvd-train: rank {strategy.rank} failed: {type(err).__name__}: {err}", file=sys.stderr)
        traceback.print_exc()
        sys.stderr.flush()
        abort_job(1)
    teardown()
    return summary
