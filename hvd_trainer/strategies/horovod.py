"""Horovod ring-allreduce: the default strategy.

Does what a careful Horovod user does by hand: knobs set in the environment before
``hvd.init()``, one thread budget per rank, ``DistributedOptimizer(named_parameters=...)`` with
compression / op / accumulation / predivide, clipping between ``synchronize()`` and a
``skip_synchronize()`` step, and rank 0's state broadcast at start and after a resume.
"""
from __future__ import annotations

import functools
import importlib.util
import mmap
import os
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import nn

from .. import syncbn
from ..config import ConfigError, HorovodConfig, TrainConfig
from ..runtime import world as run_world
from ..runtime.launch_env import apply_mpi_defaults, apply_torch_defaults
from ..execution import LossFn
from ..parallel.layout import Layout
from .base import NonFiniteGradient, StepPlan, Strategy, average_op, checked_update, ring_bytes, threads_per_rank, unwrap

# With the patched build (scripts/horovod-wake-on-wait.patch) a wait for a result starts a
# cycle at once, so on CPU the cycle only sets how often idle negotiation wakes up and competes
# with backward for the core: a long one is cheaper there. Without the patch, or on GPUs, the
# cycle delays every exchange, so the short one stays. A value in the environment wins.
DEFAULT_CYCLE_TIME_MS = 2.0
WAKE_CYCLE_TIME_MS = 50.0
_WAKE_SYMBOL = b"WakeBackgroundLoop"  # exported by the patched build only

_KNOBS = {  # config field -> (environment variable, converter to the env value)
    "fusion_threshold_mb": ("HOROVOD_FUSION_THRESHOLD", lambda v: str(int(v * 1024 * 1024))),
    "cycle_time_ms": ("HOROVOD_CYCLE_TIME", lambda v: f"{v:g}"),
    "cache_capacity": ("HOROVOD_CACHE_CAPACITY", lambda v: str(v)),
    "timeline": ("HOROVOD_TIMELINE", lambda v: str(v)),
    "wake_on_wait": ("HOROVOD_WAKE_ON_WAIT", lambda v: str(int(v))),
}


@functools.lru_cache(maxsize=1)
def patched_build() -> bool:
    """Whether the installed Horovod has the wake-on-wait patch (read from its torch library,
    without loading it)."""
    spec = importlib.util.find_spec("horovod")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        for lib in Path(folder, "torch").glob("mpi_lib_v2*.so"):
            with open(lib, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
                return m.find(_WAKE_SYMBOL) >= 0
    return False


def apply_horovod_env(cfg: HorovodConfig, environ: Optional[dict] = None, cpu: bool = True) -> dict[str, str]:
    """Export the configured knobs and the MPI runtime defaults before ``hvd.init()``; a value
    already in the environment wins. Returns the effective values (None where Horovod's
    built-in default applies). ``cpu``: the ranks train on CPU (the long cycle's case)."""
    env = os.environ if environ is None else environ
    effective: dict[str, Any] = {}
    for field, (var, conv) in sorted(_KNOBS.items(), key=lambda kv: kv[0] == "cycle_time_ms"):
        value = getattr(cfg, field)
        if field == "cycle_time_ms" and value is None:  # after wake_on_wait: it depends on it
            woken = effective["HOROVOD_WAKE_ON_WAIT"] == "1" and patched_build()
            value = WAKE_CYCLE_TIME_MS if woken and cpu else DEFAULT_CYCLE_TIME_MS
        if var not in env and value is not None:
            env[var] = conv(value)
        effective[var] = env.get(var)
    effective.update(apply_mpi_defaults(env))
    return effective


def apply_stall_env(peer_timeout_s: float, environ: Optional[dict] = None) -> dict[str, Optional[str]]:
    """Horovod's stall inspector as the backstop for a lost rank where the control plane has no
    side channel (``horovodrun --gloo``): warn after ``peer_timeout_s``, shut down after twice
    that (under MPI the heartbeat names the lost rank first). A value in the environment wins."""
    env = os.environ if environ is None else environ
    names = ("HOROVOD_STALL_CHECK_TIME_SECONDS", "HOROVOD_STALL_SHUTDOWN_TIME_SECONDS")
    if peer_timeout_s > 0:
        env.setdefault(names[0], str(max(1, round(peer_timeout_s))))
        env.setdefault(names[1], str(max(2, round(2 * peer_timeout_s))))
    return {name: env.get(name) for name in names}


class HorovodStrategy(Strategy):
    name = "horovod"
    pipelines = True  # the replicas of a stage reduce over a Horovod process set

    def __init__(self, cfg: TrainConfig, precision=None, executor=None) -> None:
        super().__init__(cfg, precision, executor)
        self.hcfg = cfg.horovod
        self._env: dict[str, Any] = {}
        self.hvd = None
        self._step_bytes = 0
        self.replica_set = None  # the process set of this rank's stage replicas (all ranks: the global set)

    @classmethod
    def check(cls, cfg: TrainConfig, world_size: int) -> None:
        if cfg.horovod.op == "adasum" and world_size & (world_size - 1):
            raise ConfigError(f"horovod.op: adasum needs a power-of-two number of ranks, got {world_size}")
        # Adasum reduces each rank's update inside step(): no averaged gradient to clip or check
        if cfg.horovod.op == "adasum" and cfg.optim.grad_clip > 0:
            raise ConfigError("optim.grad_clip: not supported with horovod.op=adasum (each rank's "
                              "update is reduced inside the step)")
        if cfg.horovod.op == "adasum" and cfg.optim.nonfinite == "skip":
            raise ConfigError("optim.nonfinite: skip is not supported with horovod.op=adasum: use stop")
        if cfg.parallel.pipeline_stages > 1 and cfg.horovod.op == "adasum":
            raise ConfigError("horovod.op: adasum is not supported with parallel.pipeline_stages > 1")

    def init(self) -> None:
        self._env = apply_horovod_env(self.hcfg, cpu=not torch.cuda.is_available())
        self._env.update(apply_torch_defaults())  # recorded (applied when hvd_trainer was imported)
        self._env.update(apply_stall_env(self.cfg.runtime.peer_timeout_s))
        try:
            import horovod.torch as hvd
        except ImportError as err:
            raise RuntimeError(f"horovod.torch is not importable ({err}); run scripts/install.sh") from None
        sets = self._stage_sets(hvd)
        # confined to a group of the job (hvd-tune): Horovod's world is that group
        group = run_world.comm() if run_world.scope() is not None else None
        hvd.init(comm=group, process_sets=sets or None)
        self.hvd = hvd
        self.rank, self.size = hvd.rank(), hvd.size()
        # None: one replica of the pipeline, nothing to exchange. Horovod is then left out of
        # the step: its background loop coordinates every process set on every rank each
        # cycle, and a stage's wait would be paced by the other stages' cycles.
        self.replica_set = (None if self.layout.stages > 1 and self.dp_size == 1
                            else sets[self.layout.stage_of(self.rank)] if sets else hvd.global_process_set)
        self.local_rank, self.local_size = hvd.local_rank(), hvd.local_size()
        if torch.cuda.is_available():  # GPU path: one device per local rank (not exercised here)
            torch.cuda.set_device(self.local_rank)
            self.device = torch.device("cuda", self.local_rank)
        torch.set_num_threads(threads_per_rank(self.cfg.runtime.threads, self.local_size))

    def _stage_sets(self, hvd) -> list:
        """One process set per pipeline stage, holding its replicas; registered at init, by
        every rank alike (none without pipeline stages)."""
        stages = self.cfg.parallel.pipeline_stages if self.pipelines else 1
        if stages == 1:
            return []
        from ..runtime.launch_env import launched_by_mpi
        if not launched_by_mpi():
            raise ConfigError("parallel.pipeline_stages: pipeline stages need an MPI launcher (mpirun, srun)")
        world = run_world.comm().Get_size()
        if world % stages or world == stages:  # check() names the first; the second has no replicas
            return []
        layout = Layout(world, stages)
        return [hvd.ProcessSet(layout.stage_group(s)) for s in range(stages)]

    def shutdown(self, reason: Optional[str] = None) -> None:
        if self.hvd is not None:
            self.hvd.shutdown()

    def prepare(self, model, optimizer, plan: StepPlan):
        hvd = self.hvd
        if self.replica_set is None:
            return model, optimizer
        compression = hvd.Compression.fp16 if self.hcfg.compression == "fp16" else hvd.Compression.none
        op = hvd.Adasum if self.hcfg.op == "adasum" else hvd.Average
        params = [p for p in model.parameters() if p.requires_grad]
        self._step_bytes = ring_bytes(params, self.dp_size, 0.5 if self.hcfg.compression == "fp16" else 1.0)
        optimizer = hvd.DistributedOptimizer(
            optimizer, named_parameters=model.named_parameters(), compression=compression,
            backward_passes_per_step=self.executor.backward_passes(plan.accumulation_steps), op=op,
            gradient_predivide_factor=self.hcfg.gradient_predivide_factor, groups=self.hcfg.groups,
            process_set=self.replica_set)
        return model, optimizer

    def sync_batchnorm(self, model: nn.Module) -> nn.Module:
        hvd = self.hvd
        if self.device.type == "cuda":  # Horovod's own layer is GPU-only (not exercised here)
            return syncbn.convert(model, lambda bn: hvd.SyncBatchNorm(
                bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats))
        return syncbn.convert(model, syncbn.global_bn(lambda t: hvd.allreduce(t, op=hvd.Sum)))

    def train_step(self, model, optimizer, micro_batches: Sequence, loss_fn: LossFn, grad_clip: float):
        optimizer.zero_grad()
        loss = self.executor.forward_backward(model, micro_batches, loss_fn, self.precision)
        self.phases.lap("compute")
        if self.hcfg.op == "adasum":
            # Adasum reduces each rank's local update inside step(): nothing to check before it,
            # but the parameters after it are the same on every rank
            optimizer.step()
            self.phases.lap("exchange")  # the reduction and the update are one call
            norm = torch.nn.utils.get_total_norm(list(model.parameters()))
            if not bool(torch.isfinite(norm)):
                raise NonFiniteGradient(f"parameter norm {float(norm)} after an Adasum step")
            return loss
        if self.replica_set is None:  # a single pipeline: each stage's gradient is complete
            checked_update(model, optimizer, grad_clip, self.precision, self.executor.grad_norm)
            self.phases.lap("optimizer")
            return loss
        # Check and clip the *averaged* gradient (fp16: unscaled first): wait for the allreduce,
        # then step without a second allreduce.
        optimizer.synchronize()
        self.bytes_sent += self._step_bytes
        self.phases.lap("exchange")
        with optimizer.skip_synchronize():
            checked_update(model, optimizer, grad_clip, self.precision, self.executor.grad_norm)
        self.phases.lap("optimizer")
        return loss

    # With pipeline stages, ``root_rank`` is a replica: each stage takes its own replica's
    # copy, over the stage's process set (Horovod's root is a global rank there too).
    def _stage_root(self, root_rank: int) -> int:
        return self.layout.rank_of(root_rank, self.layout.stage_of(self.rank))

    def _broadcast_tensors(self, tensors: dict[str, torch.Tensor], root_rank: int) -> None:
        if self.layout.stages == 1:
            self.hvd.broadcast_parameters(tensors, root_rank=root_rank)
            return
        if self.replica_set is None:  # the stage's only replica
            return
        root = self._stage_root(root_rank)
        handles = [self.hvd.broadcast_async_(t, root, name=f"stage.bcast.{name}", process_set=self.replica_set)
                   for name, t in sorted(tensors.items())]
        for h in handles:
            self.hvd.synchronize(h)

    def broadcast_parameters(self, model, root_rank: int = 0) -> None:
        self._broadcast_tensors(unwrap(model).state_dict(), root_rank)

    def broadcast_optimizer_state(self, optimizer, root_rank: int = 0) -> None:
        # A fresh optimizer has no state on any rank, and Horovod would create it with a
        # zero-gradient step (advancing Adam's step count, applying weight decay): skip it then.
        # (Every rank agrees: after a resume all have state, before one none has.)
        if not optimizer.state_dict()["state"]:
            return
        if self.layout.stages == 1:
            self.hvd.broadcast_optimizer_state(optimizer, root_rank=root_rank)
            return
        if self.replica_set is None:
            return
        optimizer.load_state_dict(self.hvd.broadcast_object(
            optimizer.state_dict(), root_rank=self._stage_root(root_rank), name="stage.optimizer_state",
            process_set=self.replica_set))

    def broadcast_buffers(self, model: nn.Module, root_rank: int = 0) -> None:
        buffers = dict(unwrap(model).named_buffers())
        if buffers and self.dp_size > 1:
            self._broadcast_tensors(buffers, root_rank)

    def barrier(self) -> None:
        self.hvd.barrier()

    def allreduce(self, tensor, op: str = "average"):
        hvd = self.hvd
        # named: an unnamed op is named by its handle, and the stages of a pipeline issue
        # different numbers of (process-set) ops, so the handles of one world op would differ
        name = f"hvd_trainer.allreduce.{op}.{tensor.dtype}.{'x'.join(map(str, tensor.shape))}"
        return hvd.allreduce(tensor, op=hvd.Average if average_op(op) else hvd.Sum, name=name)

    def allgather_object(self, obj):
        return self.hvd.allgather_object(obj)

    def broadcast_object(self, obj, root_rank: int = 0):
        # an explicit name: Horovod's default is the object's type name, which differs between
        # the root's object and the others' placeholder, and the ranks would wait on each other
        return self.hvd.broadcast_object(obj, root_rank=root_rank, name="hvd_trainer.broadcast_object")

    def settings(self) -> dict[str, Any]:
        out = dict(self._env)
        out.update(op=self.hcfg.op, compression=self.hcfg.compression, groups=self.hcfg.groups,
                   gradient_predivide_factor=self.hcfg.gradient_predivide_factor,
                   controller="mpi" if self.hvd.mpi_enabled() and not os.environ.get("HOROVOD_GLOO_RENDEZVOUS_ADDR") else "gloo",
                   threads_per_rank=torch.get_num_threads())
        return out

