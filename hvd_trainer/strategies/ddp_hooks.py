"""What DDP sends for each gradient bucket (``ddp.comm_hook``): torch's own communication hooks.

``none`` is torch's ``allreduce_hook`` (the same average as no hook), ``fp16`` its
``fp16_compress_hook``, ``powersgd`` its ``powerSGD_hook``. :class:`CommHook` wraps the chosen
one to note when each bucket was ready (the end of this rank's backward compute, for the
monitor), and holds PowerSGD's state: its error feedback differs on every rank, so a checkpoint
gathers every rank's and a resume gives each rank its own back (the continuation is exact).
"""
from __future__ import annotations

import math
import time
import warnings
from typing import Any, Iterable, Optional

import numpy as np
import torch
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.distributed.algorithms.ddp_comm_hooks.powerSGD_hook import PowerSGDState, powerSGD_hook

from ..config import DDPConfig

MIN_COMPRESSION = 2  # torch's default min_compression_rate: a matrix is factored only if 2x smaller


class CommHook:
    """The hook of one DDP model (every training rank builds one, alike). ``group``: the process
    group DDP reduces over (None: the world); ``seed``: PowerSGD's random initial factors, which
    must be the same on every rank."""

    def __init__(self, dcfg: DDPConfig, group=None, seed: int = 0) -> None:
        self.kind = dcfg.comm_hook
        self.group = group
        self.bucket_ready: Optional[float] = None  # when the last bucket of this step was handed over
        self.powersgd: Optional[PowerSGDState] = None
        if self.kind == "powersgd":
            self.powersgd = PowerSGDState(process_group=group, matrix_approximation_rank=dcfg.powersgd_rank,
                                          start_powerSGD_iter=dcfg.powersgd_warmup_steps,
                                          random_seed=seed % 2**32)
        self._position: dict[int, int] = {}         # id(parameter) -> its index in the model
        self._layout: dict[int, tuple[int, ...]] = {}  # bucket index -> its parameters' indices
        self._shapes: list[tuple[int, ...]] = []
        self._loose: Optional[dict[str, Any]] = None  # memory per parameter, to be put into buckets
        self._ddp_steps = 0      # steps this DDP has run
        self._step_start = True  # the next call is a step's first bucket

    def register(self, ddp: nn.Module) -> None:
        params = list(ddp.module.parameters())
        self._position = {id(p): i for i, p in enumerate(params)}
        self._shapes = [tuple(p.shape) for p in params]
        ddp.register_comm_hook(self, _run)

    def __call__(self, bucket):
        self.bucket_ready = time.perf_counter()
        if self.kind == "fp16":
            return default_hooks.fp16_compress_hook(self.group, bucket)
        if self.kind == "none":
            return default_hooks.allreduce_hook(self.group, bucket)
        if self._step_start and self._ddp_steps == 1 and self.powersgd.error_dict:
            # DDP rebuilt its buckets before its second step: the memory goes to the new ones
            self._loose = self._per_parameter()
            self.forget()
        self._step_start = False
        index = bucket.index()
        self._layout[index] = tuple(self._position[id(p)] for p in bucket.parameters())
        if self._loose is not None:
            self._install(index, bucket.buffer().device)
        if bucket.is_last():  # called last (DDP launches its buckets in order)
            self._loose, self._step_start, self._ddp_steps = None, True, self._ddp_steps + 1
        return powerSGD_hook(self.powersgd, bucket)

    # --- PowerSGD's state in checkpoints ---------------------------------------------------------
    # torch keeps PowerSGD's memory per bucket, and a DDP's first step runs on other buckets than
    # the later ones (rebuilt in the order backward makes gradients ready): so a checkpoint holds
    # it per parameter, and each bucket's is put together again at its first call, then again
    # after the rebuild. (A fresh run has no memory before the rebuild: the warm-up is >= 2 steps.)
    def state_dict(self) -> dict[str, Any]:
        """This rank's PowerSGD state ({} for the other hooks): tensors and plain values, for a
        weights-only checkpoint; the memory per parameter (its position in the model)."""
        s = self.powersgd
        if s is None:
            return {}
        kind, keys, pos, has_gauss, cached = s.rng.get_state()
        return {"rank": self.rank, "iter": s.iter, **self._per_parameter(),
                "rng": [str(kind), [int(k) for k in keys], int(pos), int(has_gauss), float(cached)],
                "numel": [s.total_numel_before_compression, s.total_numel_after_compression]}

    def load_state_dict(self, saved: Optional[dict[str, Any]]) -> Optional[str]:
        """Take back what :meth:`state_dict` wrote on this rank (None: nothing was saved for it).
        Returns a note when PowerSGD cannot continue exactly: it then starts over, warm-up first."""
        s = self.powersgd
        if s is None:
            return None
        if not saved:
            return "the checkpoint holds no PowerSGD state for this rank: PowerSGD starts over (warm-up first)"
        if saved["rank"] != self.rank:
            return (f"the checkpoint's PowerSGD rank is {saved['rank']}, this run's {self.rank}: "
                    f"PowerSGD starts over (warm-up first)")
        kind, keys, pos, has_gauss, cached = saved["rng"]
        s.rng.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
        s.iter = int(saved["iter"])
        s.total_numel_before_compression, s.total_numel_after_compression = saved["numel"]
        self._loose = {"warm": saved["warm"], "params": saved["params"]}
        return None

    def _per_parameter(self) -> dict[str, Any]:
        """PowerSGD's memory by parameter position: its error feedback, and its factors P and Q
        when it is factored; ``warm``: whether factors are kept (else each step draws new ones)."""
        s = self.powersgd
        params: dict[int, dict[str, torch.Tensor]] = {}
        for index, error in s.error_dict.items():
            layout = self._layout[index]
            for position, (e, p, q) in zip(layout, _slices([self._shapes[i] for i in layout], self.rank)):
                params[position] = {"error": error[e].detach().cpu().clone()}
                if p is not None and index in s.p_memory_dict:
                    params[position]["p"] = s.p_memory_dict[index][p].detach().cpu().clone()
                    params[position]["q"] = s.q_memory_dict[index][q].detach().cpu().clone()
        return {"warm": bool(s.p_memory_dict), "params": params}

    @property
    def rank(self) -> int:
        return self.powersgd.matrix_approximation_rank

    def _install(self, index: int, device: torch.device) -> None:
        """Bucket ``index``'s memory, put together from its parameters' restored memory."""
        saved, layout = self._loose, self._layout[index]
        if not saved["params"]:  # saved during the warm-up: nothing to remember
            return
        if not all(i in saved["params"] for i in layout):  # not expected: every bucket's is saved
            warnings.warn("ddp.comm_hook=powersgd: the checkpoint lacks PowerSGD's memory of some "
                          "parameters: its error feedback restarts")
            self.forget()
            self._loose = None
            return
        slices = _slices([self._shapes[i] for i in layout], self.rank)
        s = self.powersgd
        s.error_dict[index] = torch.cat([saved["params"][i]["error"] for i in layout]).to(device)
        if saved["warm"]:
            p_len = max((p.stop for _, p, _ in slices if p is not None), default=0)
            q_len = max((q.stop for _, _, q in slices if q is not None), default=0)
            s.p_memory_dict[index] = torch.empty(p_len, dtype=s.error_dict[index].dtype, device=device)
            s.q_memory_dict[index] = torch.empty(q_len, dtype=s.error_dict[index].dtype, device=device)
            for i, (_, p, q) in zip(layout, slices):
                if p is not None:
                    s.p_memory_dict[index][p] = saved["params"][i]["p"]
                    s.q_memory_dict[index][q] = saved["params"][i]["q"]

    def forget(self) -> None:
        """Drop PowerSGD's error feedback and factors (kept: the step count and random stream).
        After a step skipped for a non-finite gradient they hold NaN, which every later step
        would add in. Every rank calls it at the same step, so the new factors agree."""
        if self.powersgd is not None:
            for memory in (self.powersgd.error_dict, self.powersgd.p_memory_dict, self.powersgd.q_memory_dict):
                memory.clear()

    # --- what travels -------------------------------------------------------------------------------
    def bytes_per_step(self, params: Iterable[torch.Tensor], step: Optional[int] = None) -> int:
        """Bytes this rank puts into the allreduces of one optimizer step for ``params`` (a ring
        sends and receives about twice that). PowerSGD sends P (n x r) and Q (m x r) for each
        factored matrix; during warm-up (``step`` < warm-up steps) it sends fp32 gradients whole."""
        total = 0
        warm = self.powersgd is not None and step is not None and step < self.powersgd.start_powerSGD_iter
        for p in params:
            if not p.requires_grad:
                continue
            if self.kind == "fp16":
                total += p.numel() * 2
            elif self.kind == "none" or warm:
                total += p.numel() * p.element_size()
            else:
                n, m, r = _matrix(tuple(p.shape), self.rank)
                total += ((n + m) * r if _factored(n, m, r) else n * m) * p.element_size()
        return total

    def settings(self) -> dict[str, Any]:
        out: dict[str, Any] = {"comm_hook": self.kind}
        if self.powersgd is not None:
            out.update(powersgd_rank=self.rank,
                       powersgd_warmup_steps=self.powersgd.start_powerSGD_iter)
        return out


# unannotated: DDP checks a hook's annotations against torch's classes, and this module's are
# strings (from __future__ import annotations); DDP calls hook(state, bucket)
def _run(hook, bucket):
    return hook(bucket)


def _matrix(shape: tuple[int, ...], rank: int) -> tuple[int, int, int]:
    """(n, m, r): the n x m matrix PowerSGD views a gradient of ``shape`` as, and its rank there."""
    n = shape[0] if shape else 1
    m = math.prod(shape) // max(n, 1)
    return n, m, min(n, m, rank)


def _factored(n: int, m: int, r: int) -> bool:
    """Whether PowerSGD sends factors (n + m) x r, not the n x m matrix (torch's _should_compress)."""
    return (n + m) * r * MIN_COMPRESSION < n * m


def _slices(shapes: list[tuple[int, ...]], rank: int) -> list[tuple[slice, Optional[slice], Optional[slice]]]:
    """Where each gradient of a bucket (``shapes``, in the bucket's order) sits in PowerSGD's flat
    memory of that bucket: in the error feedback, and in the factors P and Q (None: sent whole).
    As torch's powerSGD_hook lays them out: gradients one after another; factors grouped by
    matrix shape, the shapes in order of first appearance."""
    out: list[list] = []
    offset = 0
    groups: dict[tuple[int, int], list[int]] = {}
    for i, shape in enumerate(shapes):
        numel = math.prod(shape)
        out.append([slice(offset, offset + numel), None, None])
        offset += numel
        n, m, r = _matrix(shape, rank)
        if _factored(n, m, r):
            groups.setdefault((n, m), []).append(i)
    p = q = 0
    for (n, m), members in groups.items():
        r = min(n, m, rank)
        for i in members:
            out[i][1], out[i][2] = slice(p, p + n * r), slice(q, q + m * r)
            p, q = p + n * r, q + m * r
    return [tuple(x) for x in out]
