"""The one object the loop tells what happens, at a few fixed points; it measures, gathers and
fans out to the sinks the config asks for. Every training rank calls every method (``epoch``
gathers); only rank 0 holds sinks.

    open(resumed_step)  step_begin(step) / step_end(step, loss, lr)  epoch(record)  summary(s)  close(s)
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

from .phases import STEP_PARTS, StepPhases, mean_over, per_step
from .resources import ResourceMeter
from .straggler import describe, find_stragglers

TIME_KEYS = tuple(f"{p}_s" for p in STEP_PARTS) + ("step_s", "eval_s")


class Monitor:
    """``strategy`` is used for its rank, device, phases and two small collectives (one
    broadcast at open, one allgather per epoch); ``out`` prints rank 0's lines."""

    def __init__(self, cfg, strategy, out) -> None:
        self.cfg, self.rcfg, self.strategy, self.out = cfg, cfg.runtime, strategy, out
        self.phases: StepPhases = strategy.phases
        self.resources = ResourceMeter(strategy.device)
        self.sinks: list[Any] = []
        self.profiler = None
        self.run_totals: dict[int, dict[str, Any]] = {}  # rank -> summed seconds, steps, peaks
        self.stragglers: list[dict[str, Any]] = []
        self.epoch_no = 0

    # --- start and end -------------------------------------------------------------------------------
    def open(self, resumed_step: int) -> None:
        """Collective, before the first step: rank 0 opens its sinks (a metrics port already
        taken is the same ConfigError on every rank, so the job ends in order, exit 2)."""
        from ..config import ConfigError
        error = None
        if self.strategy.rank == 0:
            try:
                self._make_sinks(resumed_step)
            except ConfigError as err:
                error = str(err)
        error = self.strategy.broadcast_object(error)
        if error:
            self.close({})
            raise ConfigError(error)
        self.phases.take()  # the resume's collectives are no step's time
        self.resources.sample()

    def _make_sinks(self, resumed_step: int) -> None:
        """Into ``self.sinks`` one by one, so that those opened before a failure are closed."""
        r, run_dir = self.rcfg, Path(self.cfg.run_dir)
        if r.tensorboard:
            from .tensorboard import TensorBoardSink
            self.sinks.append(TensorBoardSink(str(run_dir / "tensorboard"), resume_step=resumed_step))
        if r.metrics_port is not None or r.metrics_textfile:
            from .prometheus import PrometheusSink
            self.sinks.append(PrometheusSink(r.metrics_port, address=r.metrics_address, textfile=r.metrics_textfile,
                                             host=self.resources.host, run=run_dir.name, linger_s=r.metrics_linger_s))

    def close(self, summary: dict[str, Any]) -> None:
        """Every training rank, once, also after a failure (``summary`` then ``{}``)."""
        self._stop_profiler()
        sinks, self.sinks = self.sinks, []
        for sink in sinks:
            sink.close(summary, self.cfg.to_dict())

    # --- steps ------------------------------------------------------------------------------------------
    def step_begin(self, step: int) -> None:
        """Before step ``step`` (1-based) fetches its data."""
        self.phases.begin()
        window = self.rcfg.profile_steps
        if window is not None and step == window[0] and self.profiler is None:
            self._start_profiler()
            self.phases.lap("other")

    def data_ready(self) -> None:
        self.phases.lap("data")

    def step_end(self, step: int, loss, lr: float) -> None:
        """After step ``step`` and everything the loop does with it (checkpoint, stop check)."""
        if self.sinks and loss is not None:
            for sink in self.sinks:
                sink.step(step, float(loss), lr)
        window = self.rcfg.profile_steps
        if self.profiler is not None and window is not None and step >= window[1]:
            self._stop_profiler()
        self.phases.end()  # the sinks' and the profiler's own time is part of the step (other)

    def evaluating(self):
        return self.phases.evaluating()

    # --- epochs -----------------------------------------------------------------------------------------
    def epoch(self, record: dict[str, Any]) -> dict[str, Any]:
        """Collective, once per epoch (one small allgather): every rank's breakdown and
        resources join rank 0's row; stragglers are named. Returns the row to write."""
        totals = self.phases.take()
        s = self.strategy
        mine = {"rank": s.rank, "host": self.resources.host, "stage": s.layout.stage_of(s.rank),
                "steps": totals["steps"], **per_step(totals), **self.resources.sample()}
        ranks = self.strategy.allgather_object((mine, totals))
        self.epoch_no += 1
        if self.strategy.rank != 0:
            return record
        rows = [r for r, _ in ranks]
        for row, raw in ranks:
            self._accumulate(row, raw)
        found = find_stragglers(rows, self.rcfg.straggler_factor, self.rcfg.straggler_min_ms / 1000.0)
        for s in found:
            self.out.print("warning: " + describe(s))
        self.stragglers += [{"epoch": record.get("epoch"), **s} for s in found]
        record = {**record, "time": mean_over(rows, TIME_KEYS), "ranks": rows, "stragglers": found}
        for sink in self.sinks:
            sink.epoch(record)
        return record

    def _accumulate(self, row: dict[str, Any], raw: dict[str, Any]) -> None:
        run = self.run_totals.setdefault(row["rank"], {"rank": row["rank"], "host": row["host"]})
        for k, v in raw.items():
            run[k] = run.get(k, 0) + v
        for k in ("rss_mb", "cpu_util", "gpu_mb"):
            run[k] = row[k]
        for k in ("peak_rss_mb", "gpu_peak_mb"):
            if row[k] is not None:
                run[k] = max(run.get(k) or 0.0, row[k])
        run["epochs"] = run.get("epochs", 0) + 1

    def summary(self) -> dict[str, Any]:
        """The run's breakdown for summary.json (rank 0; the others return ``{}``)."""
        if self.strategy.rank != 0 or not self.run_totals:
            return {}
        ranks = []
        for rank in sorted(self.run_totals):
            run = self.run_totals[rank]
            raw = {k: run.get(k, 0.0) for k in ("steps", "eval_s") + tuple(f"{p}_s" for p in STEP_PARTS)}
            ranks.append({"rank": rank, "host": run["host"], "steps": run.get("steps", 0), **per_step(raw),
                          **{k: run.get(k) for k in ("rss_mb", "peak_rss_mb", "cpu_util", "gpu_mb", "gpu_peak_mb")}})
        return {"time_breakdown": mean_over(ranks, TIME_KEYS), "ranks": ranks, "stragglers": self.stragglers}

    # --- the torch profiler window (runtime.profile_steps) --------------------------------------------
    def _start_profiler(self) -> None:
        import torch
        acts = [torch.profiler.ProfilerActivity.CPU]
        if self.strategy.device.type == "cuda":  # not exercised here: no GPU on this project's machines
            acts.append(torch.profiler.ProfilerActivity.CUDA)
        self.profiler = torch.profiler.profile(activities=acts)
        self.profiler.__enter__()

    def _stop_profiler(self) -> None:
        prof, self.profiler = self.profiler, None
        if prof is None:
            return
        prof.__exit__(None, None, None)
        traces = Path(self.cfg.run_dir) / "traces"
        traces.mkdir(parents=True, exist_ok=True)
        path = traces / f"rank{self.strategy.rank}.json"
        prof.export_chrome_trace(str(path) + ".tmp")
        os.replace(str(path) + ".tmp", path)
        self.out.log_rank(f"profiler trace written to {path}")


def compact(time_row: dict[str, float]) -> str:
    """The epoch line's form: step time and each part's share of it."""
    step = time_row.get("step_s", 0.0)
    if step <= 0:
        return ""
    parts = " ".join(f"{p} {100 * time_row.get(f'{p}_s', 0.0) / step:.0f}%" for p in STEP_PARTS)
    return f"step {1000 * step:.1f}ms: {parts}"
