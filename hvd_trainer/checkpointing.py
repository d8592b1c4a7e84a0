"""The checkpoint manager: when to save, what never to save (non-finite weights), who writes
(rank 0), and the resume protocol (rank 0 reads and broadcasts; no shared file system needed).
The file format is :mod:`.checkpoint`'s. Every method here is called by every training rank.
"""
from __future__ import annotations

from typing import Optional

import torch

from .checkpoint import Checkpointer, torch_load_bytes
from .config import CheckpointConfig, ConfigError, OptimConfig
from .output import Output
from .runtime.errors import NonFiniteError
from .state import TrainState
from .strategies.base import NonFiniteGradient, Strategy


class CheckpointManager:
    def __init__(self, cfg: CheckpointConfig, run_dir: str, strategy: Strategy, out: Output,
                 sync_batchnorm: bool = False) -> None:
        self.cfg, self.strategy, self.out = cfg, strategy, out
        self.files = Checkpointer(f"{run_dir}/checkpoints", cfg.keep)
        self.sync_batchnorm = sync_batchnorm  # buffers already agree: no broadcast before a save
        self.saved_step: Optional[int] = None  # the step of this run's newest checkpoint
        self.resumed_step: Optional[int] = None  # the step this run resumed from (summary.json)

    # --- when -----------------------------------------------------------------------------------------
    def after_step(self, st: TrainState, stopping: bool) -> None:
        every = self.cfg.every_steps
        if stopping or (every and st.step % every == 0):
            self.save(st)

    def after_epoch(self, st: TrainState, completed: bool) -> None:
        every = self.cfg.every_epochs
        if completed and every and st.epoch % every == 0:
            self.save(st)

    def at_end(self, st: TrainState) -> None:
        """The trained model is always kept on disk."""
        if self.saved_step != st.step:
            self.save(st)

    # --- how ------------------------------------------------------------------------------------------
    def save(self, st: TrainState) -> None:
        """BN buffers are rank 0's, RNG streams every rank's; rank 0 writes."""
        if not self.sync_batchnorm:
            self.strategy.broadcast_buffers(st.model)
        payload = st.state_dict()  # the whole model on every rank, also from pipeline stages
        floats = [t for t in payload["model"].values() if torch.is_tensor(t) and t.is_floating_point()]
        if floats and not bool(torch.isfinite(torch.nn.utils.get_total_norm(floats))):
            # never let NaN weights replace good checkpoints (keep prunes the oldest)
            raise NonFiniteError(f"step {st.step}: the weights hold NaN or infinity; "
                                 f"refusing to checkpoint them{self.last_good()}")
        if self.strategy.rank == 0:
            self.out.log_rank(f"checkpoint {self.files.save(payload)}")
        self.saved_step = st.step

    def last_good(self) -> str:
        newest = self.files.list()[:1]
        return f"; the last good checkpoint is {newest[0]}" if newest else "; no checkpoint was written"

    # --- resume ---------------------------------------------------------------------------------------
    def restore(self, st: TrainState, resume: str, collective: bool = True) -> None:
        """Resume from rank 0's newest usable checkpoint (if any; every skipped one is reported),
        then make every rank's parameters and optimizer state equal to rank 0's. Not
        ``collective``: rank 0 alone loads it (Horovod elastic then syncs every rank to it)."""
        s = self.strategy
        message = None
        if s.rank == 0 and resume == "auto":
            found = self.files.find()
            message = {"path": str(found.path) if found.path else None, "data": found.data,
                       "skipped": found.skipped, "unusable": found.unusable}
        if collective:
            message = s.broadcast_object(message)
        if message is not None:
            for path, reason in message["skipped"]:
                self.out.print(f"hvd-train: skipped checkpoint {path}: {reason}")
            if message["unusable"]:
                raise ConfigError(f"checkpoint.resume: no usable checkpoint in {self.files.dir} "
                                  f"({len(message['skipped'])} skipped, reasons above); refusing to start "
                                  f"over them: move them away or set checkpoint.resume=never")
            if message["data"] is not None:
                note = st.load_state_dict(torch_load_bytes(message["data"]))
                self.saved_step = self.resumed_step = st.step
                self.out.forget_metrics_after(st.step)
                if note:
                    self.out.print(f"note: {note}")
                self.out.print(f"resumed from {message['path']} at step {st.step} (epoch {st.epoch}, "
                               f"batch {st.batch_in_epoch})")
        if collective:
            s.broadcast_parameters(st.model)
            s.broadcast_optimizer_state(st.optimizer)


class NonFiniteGuard:
    """``optim.nonfinite``: a step whose gradient is not finite stops the run, or is skipped up
    to ``max_skipped_steps``. Every rank gets the same verdict at the same step (it is taken on
    the averaged gradient)."""

    def __init__(self, cfg: OptimConfig, out: Output, checkpoints: CheckpointManager) -> None:
        self.cfg, self.out, self.checkpoints = cfg, out, checkpoints

    def skip(self, err: NonFiniteGradient, step: int, skipped_so_far: int) -> int:
        """The skipped-step count after skipping ``step``, or NonFiniteError."""
        skipped = skipped_so_far + 1
        where = f"step {step}: non-finite gradient ({err})"
        if self.cfg.nonfinite == "stop":
            raise NonFiniteError(f"{where}; optim.nonfinite=stop{self.checkpoints.last_good()}")
        if skipped > self.cfg.max_skipped_steps:
            raise NonFiniteError(f"{where}: {skipped} skipped steps, more than optim.max_skipped_steps="
                                 f"{self.cfg.max_skipped_steps}{self.checkpoints.last_good()}")
        self.out.print(f"hvd-train: {where}: update skipped ({skipped} of at most {self.cfg.max_skipped_steps})")
        return skipped
