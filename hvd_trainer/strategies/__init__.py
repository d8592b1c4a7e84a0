"""Gradient-exchange strategies behind one interface (:class:`~.base.Strategy`)."""
from __future__ import annotations

from ..config import TrainConfig
from .base import Strategy


def make_strategy(cfg: TrainConfig) -> Strategy:
    """The strategy named by ``cfg.strategy`` (imports only what that strategy needs)."""
    if cfg.strategy == "horovod":
        from .horovod import HorovodStrategy
        return HorovodStrategy(cfg.horovod, cfg.runtime.threads)
    if cfg.strategy == "ddp":
        from .ddp import DDPStrategy
        return DDPStrategy(cfg.ddp, cfg.runtime.threads)
    from .ps import ParameterServerStrategy
    return ParameterServerStrategy(cfg)
