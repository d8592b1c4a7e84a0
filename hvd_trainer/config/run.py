"""The sections about the run rather than the model: checkpoints, and the runtime (threads,
liveness, monitoring)."""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, model_validator

from .base import _FieldError, _Section


class CheckpointConfig(_Section):
    every_steps: int = Field(0, ge=0)
    """Checkpoint every N optimizer steps (0: off)."""
    every_epochs: int = Field(1, ge=0)
    """Checkpoint at the end of every N epochs (0: off)."""
    keep: int = Field(3, ge=1)
    """Keep the newest K checkpoints."""
    resume: Literal["auto", "never"] = "auto"
    """``auto``: continue from the newest valid checkpoint in run_dir."""
    stop_signals: list[Literal["USR1", "USR2", "TERM", "INT", "HUP"]] = Field(
        default_factory=lambda: ["USR1", "TERM"])
    """Signals that stop training cleanly: every rank stops at the same step boundary, one
    checkpoint is written and the job exits 75, so a requeued job resumes exactly (SLURM's
    ``--signal=B:USR1@N`` warning, preemption, ``scancel``). Empty: the signals keep their
    default action."""


class RuntimeConfig(_Section):
    threads: int = Field(0, ge=0, le=4096)
    """torch threads per rank (0: cores / local ranks, at least 1)."""
    progress: bool = True
    """Show a progress bar on rank 0."""
    log_every_rank: bool = False
    """Every rank also writes its own log file into run_dir."""
    peer_timeout_s: float = Field(30.0, ge=0.0, le=86400.0)
    """A rank that sends no heartbeat for this long (killed, stopped, its node down) ends the job
    with a message naming it and its host (0: off). Heartbeats come from a thread of their own,
    so a long step or checkpoint is not silence. Horovod's stall inspector shuts down after twice
    this long, for launches without MPI (``horovodrun --gloo``)."""
    straggler_factor: float = Field(1.25, gt=1.0, le=100.0)
    """Warn, naming rank, host and part, when a rank's per-step forward+backward or data wait
    exceeds the median over ranks by this factor for an epoch."""
    straggler_min_ms: float = Field(2.0, ge=0.0, le=60000.0)
    """...and by at least this many milliseconds per step (tiny parts are noise, not news)."""
    tensorboard: bool = False
    """Rank 0 writes TensorBoard event files to ``run_dir/tensorboard``: losses, accuracy, lr,
    throughput, the step-time breakdown per rank, memory, and the config as hparams at the end."""
    metrics_port: Optional[int] = Field(None, ge=1, le=65535)
    """Serve live Prometheus metrics at ``/metrics`` on this port (rank 0), labelled by rank and
    host. A port already in use is a config error before training."""
    metrics_address: str = "127.0.0.1"
    """Address the metrics port listens on (0.0.0.0: every interface; the default: this host only)."""
    metrics_textfile: Optional[str] = None
    """Also write the metrics to this ``*.prom`` file after every epoch (node exporter's textfile
    collector)."""
    metrics_linger_s: float = Field(0.0, ge=0.0, le=3600.0)
    """Keep serving the final metrics this long after training ends, so a scrape catches them."""
    profile_steps: Optional[list[int]] = None
    """``[first, last]``: run torch's profiler over these global steps (1-based) and write a
    Chrome trace per rank to ``run_dir/traces/rank<R>.json``."""

    @model_validator(mode="after")
    def _check_profile(self) -> "RuntimeConfig":
        p = self.profile_steps
        if p is not None and not (len(p) == 2 and 1 <= p[0] <= p[1]):
            raise _FieldError("profile_steps", "must be [first, last] with 1 <= first <= last")
        return self
