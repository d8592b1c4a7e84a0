"""One process, no MPI: the loop's behaviour (steps, skips, max_steps, checkpoints, resume)
without any communication, for a laptop run and for tests that need no ranks."""
from __future__ import annotations

from typing import Any

import torch

from ..config import ConfigError, TrainConfig
from ..runtime import world as run_world
from .base import StepPlan, Strategy, checked_update, threads_per_rank


class SingleProcessStrategy(Strategy):
    name = "single"

    @classmethod
    def check(cls, cfg: TrainConfig, world_size: int) -> None:
        if world_size != 1:
            raise ConfigError(f"strategy: single runs one process, this job has {world_size}")

    def init(self) -> None:
        self.size = run_world.size()  # a launcher may have started several: check() refuses them
        if torch.cuda.is_available():  # not exercised here (no GPU)
            self.device = torch.device("cuda", 0)
        torch.set_num_threads(threads_per_rank(self.cfg.runtime.threads, 1))

    def prepare(self, model, optimizer, plan: StepPlan):
        return model, optimizer

    def sync_batchnorm(self, model):
        return model  # one process: its batch is the global batch

    def train_step(self, model, optimizer, micro_batches, loss_fn, grad_clip):
        optimizer.zero_grad()
        loss = self.executor.forward_backward(model, micro_batches, loss_fn, self.precision)
        self.phases.lap("compute")
        checked_update(model, optimizer, grad_clip, self.precision, self.executor.grad_norm)
        self.phases.lap("optimizer")
        return loss

    def broadcast_parameters(self, model, root_rank: int = 0) -> None:
        pass

    def broadcast_optimizer_state(self, optimizer, root_rank: int = 0) -> None:
        pass

    def broadcast_buffers(self, model, root_rank: int = 0) -> None:
        pass

    def barrier(self) -> None:
        pass

    def allreduce(self, tensor, op: str = "average"):
        return tensor.clone()

    def allgather_object(self, obj: Any) -> list[Any]:
        return [obj]

    def broadcast_object(self, obj: Any, root_rank: int = 0) -> Any:
        return obj

    def settings(self) -> dict[str, Any]:
        return {"threads_per_rank": torch.get_num_threads()}
