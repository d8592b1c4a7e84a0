"""What a run tells its user: the plan at start, a progress bar, a metrics row and a line per
epoch, and the summary at the end (rank 0 writes; every training rank calls, since the epoch's
totals and the summary's counters are collective)."""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from .config import TrainConfig
from .monitor.monitor import Monitor, compact
from .output import Output
from .schedule import scaled_lr
from .state import TrainState
from .strategies.base import Strategy


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


class EpochMeter:
    """One epoch's (or its remainder's) time, loss and samples on this rank, with a progress bar."""

    def __init__(self, reporter: "Reporter", steps: int, first: int, epoch: int) -> None:
        self.reporter, self.first = reporter, first
        self.bar = reporter.out.progress(steps, f"epoch {epoch + 1}/{reporter.cfg.epochs}", first)
        self.loss_sum, self.count = torch.zeros((), dtype=torch.float64), 0
        self.seconds, self.t0 = 0.0, time.perf_counter()

    def step(self, loss: Optional[torch.Tensor], micro_batches) -> None:
        n = sum(len(b[-1]) for b in micro_batches)
        if loss is not None:  # None: a skipped step
            self.loss_sum += loss.double() * n
            self.count += n
        rate = self.count * self.reporter.strategy.dp_size / max(1e-9, self.elapsed())
        self.bar.update(float(loss) if loss is not None else float("nan"), rate)

    def elapsed(self) -> float:
        return self.seconds + time.perf_counter() - self.t0

    @contextlib.contextmanager
    def paused(self):
        """Time spent here (a checkpoint write) is not training time."""
        self.seconds += time.perf_counter() - self.t0
        try:
            yield
        finally:
            self.t0 = time.perf_counter()


class Reporter:
    def __init__(self, cfg: TrainConfig, strategy: Strategy, out: Output, monitor: Monitor) -> None:
        self.cfg, self.strategy, self.out, self.monitor = cfg, strategy, out, monitor
        self.metrics = RunMetrics()
        self.t_start = time.perf_counter()
        self.layout: list[str] = []  # which rank holds which pipeline stage (none without stages)

    def global_batch_size(self) -> int:
        return self.cfg.batch_size * self.cfg.optim.accumulation_steps * self.strategy.dp_size

    def plan(self, n_params: int, train_len: int, test_len: int, steps_per_epoch: int,
             data_info: dict[str, Any]) -> None:
        s, c = self.strategy, self.cfg
        lr = scaled_lr(c.optim, s.lr_ranks)
        self.out.print(f"hvd-train: strategy={s.name} world_size={s.size} workers={s.dp_size} "
                       f"params={n_params:,} train={train_len} test={test_len}")
        self.out.print(f"  global_batch={self.global_batch_size()} (batch {c.batch_size} x accumulation "
                       f"{c.optim.accumulation_steps} x {s.dp_size} ranks)  steps/epoch={steps_per_epoch}  "
                       f"lr={c.optim.lr:g} -> {lr:g} ({c.optim.lr_scaling})  threads/rank={torch.get_num_threads()}")
        self.out.print(f"  precision={c.optim.precision}  recompute={str(c.model.recompute).lower()}  "
                       + "  ".join(f"data.{k}={v}" for k, v in data_info.items() if not isinstance(v, list)))
        self.out.print("  " + "  ".join(f"{k}={v}" for k, v in s.settings().items()))
        self.layout = s.executor.describe()  # collective under pipeline stages
        if self.layout:
            p = c.parallel
            self.out.print(f"  pipeline: {p.pipeline_stages} stages x {s.dp_size} replicas, {p.microbatches} "
                           f"microbatches per batch, schedule {p.schedule}")
            for line in self.layout:
                self.out.print(f"  {line}")

    def epoch_meter(self, steps: int, first: int, epoch: int) -> EpochMeter:
        return EpochMeter(self, steps, first, epoch)

    def end_epoch(self, meter: EpochMeter, whole_epoch: bool) -> None:
        """Collective: the epoch's loss and samples over every training rank."""
        meter.bar.close()
        m, seconds = self.metrics, meter.elapsed()
        m.train_seconds += seconds
        m.epoch_seconds = seconds if whole_epoch else None
        totals = self.strategy.allreduce(torch.tensor([float(meter.loss_sum), float(meter.count)],
                                                      dtype=torch.float64), op="sum")
        # every stage of a pipeline counts its replica's samples
        samples = int(totals[1]) // self.strategy.layout.stages
        m.samples_seen += samples
        m.epoch_samples = samples
        m.last_train_loss = float(totals[0] / max(1.0, float(totals[1])))

    def epoch_row(self, st: TrainState, evaluation: dict[str, float]) -> None:
        """Collective (the monitor gathers every rank's breakdown); rank 0 writes and prints."""
        m = self.metrics
        m.last_eval = evaluation
        record = {"epoch": st.epoch, "step": st.step, "train_loss": m.last_train_loss,
                  "lr": st.optimizer.param_groups[0]["lr"], **evaluation, "samples_per_sec": m.samples_per_sec,
                  "elapsed_s": time.perf_counter() - self.t_start}  # convergence against wall time
        if m.epoch_seconds:  # an uninterrupted epoch: its own throughput, for benchmarks
            record["epoch_samples_per_sec"] = m.epoch_samples / m.epoch_seconds
        record["samples_seen"] = m.samples_seen
        record["bytes_sent"] = self.strategy.bytes_sent  # this rank's exchange so far (rank 0's)
        record = self.monitor.epoch(record)  # collective: every rank's time breakdown joins the row
        self.out.metrics(record)
        self.out.print(f"epoch {st.epoch:>3}  step {st.step:>6}  train_loss {m.last_train_loss:.4f}  "
                       f"test_loss {evaluation['test_loss']:.4f}  "
                       f"test_acc {100 * evaluation['test_accuracy']:.2f}%  "
                       + (f"test_ppl {evaluation['test_perplexity']:.3f}  " if "test_perplexity" in evaluation else "")
                       + f"{m.samples_per_sec:.0f} samples/s  "
                       + compact(record.get("time", {})))

    def summary(self, st: TrainState, n_params: int, data_info: dict[str, Any],
                extra: dict[str, Any]) -> dict[str, Any]:
        """Collective. Every training rank returns rank 0's summary (it holds the counters that
        rank 0 collects, e.g. a parameter server's)."""
        s, m = self.strategy, self.metrics
        summary = {
            "strategy": s.name, "world_size": s.size, "workers": s.dp_size, "epochs": st.epoch,
            "steps": st.step, "global_batch_size": self.global_batch_size(),
            "final_train_loss": m.last_train_loss,
            "final_test_loss": m.last_eval.get("test_loss"),
            "final_test_accuracy": m.last_eval.get("test_accuracy"),
            **({"final_test_perplexity": m.last_eval["test_perplexity"]} if "test_perplexity" in m.last_eval else {}),
            "samples_per_sec": m.samples_per_sec,
            "train_seconds": m.train_seconds,
            "wall_seconds": time.perf_counter() - self.t_start,
            "parameters": n_params, "seed": self.cfg.seed,
            "lr": st.optimizer.param_groups[0]["lr"],
            "skipped_steps": m.skipped_steps, "settings": s.settings(), **s.counters(),
            "bytes_sent_per_rank": s.bytes_sent,
            "precision": self.cfg.optim.precision, "fp16_overflow_steps": s.precision.overflow_steps,
            "recompute": self.cfg.model.recompute, "data": data_info, **extra,
            "parallel": {**self.cfg.parallel.model_dump(), "replicas": s.dp_size, "layout": self.layout},
            **self.monitor.summary(),  # rank 0's: the time breakdown per rank, stragglers
        }
        summary = s.broadcast_object(summary)
        self.out.summary(summary)
        self.out.print("summary: " + "  ".join(f"{k}={_fmt(summary[k])}" for k in (
            "strategy", "world_size", "epochs", "global_batch_size", "final_train_loss",
            "final_test_accuracy", "final_test_perplexity", "samples_per_sec", "wall_seconds") if k in summary))
        return summary


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
