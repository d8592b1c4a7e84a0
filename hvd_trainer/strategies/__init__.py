"""Gradient-exchange strategies behind one interface (:class:`~.base.Strategy`)."""
from __future__ import annotations

import os

from ..config import TrainConfig
from .base import Strategy


def strategy_class(name: str) -> type[Strategy]:
    """The class of strategy ``name`` (imports only what that strategy needs)."""
    if name == "horovod":
        if os.environ.get("HOROVOD_ELASTIC") == "1":  # horovodrun --min-np/--max-np started it
            from .horovod_elastic import ElasticHorovodStrategy
            return ElasticHorovodStrategy
        from .horovod import HorovodStrategy
        return HorovodStrategy
    if name == "ddp":
        from .ddp import DDPStrategy
        return DDPStrategy
    if name == "ps":
        from .ps import ParameterServerStrategy
        return ParameterServerStrategy
    raise ValueError(f"unknown strategy {name!r}")


def make_strategy(cfg: TrainConfig) -> Strategy:
    """The strategy ``cfg.strategy``, not yet initialised (call ``init()``)."""
    return strategy_class(cfg.strategy)(cfg)
