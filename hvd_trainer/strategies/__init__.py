"""Gradient-exchange strategies behind one interface (:class:`~.base.Strategy`)."""
from __future__ import annotations

import os

import torch

from ..config import TrainConfig
from ..precision import Precision
from .base import Strategy


def strategy_class(name: str) -> type[Strategy]:
    """The class of strategy ``name`` (imports only what that strategy needs)."""
    if name == "horovod":
        if os.environ.get("HOROVOD_ELASTIC") == "1":  # horovodrun --min-np/--max-np started it
            from .horovod_elastic import ElasticHorovodStrategy
            return ElasticHorovodStrategy
        from .horovod import HorovodStrategy
        return HorovodStrategy
    if name == "fedavg":
        from .fedavg import FedAvgStrategy
        return FedAvgStrategy
    if name == "local_sgd":
        from .local_sgd import LocalSGDStrategy
        return LocalSGDStrategy
    if name == "ddp":
        from .ddp import DDPStrategy
        return DDPStrategy
    if name == "ps":
        from .ps import ParameterServerStrategy
        return ParameterServerStrategy
    if name == "single":
        from .single import SingleProcessStrategy
        return SingleProcessStrategy
    raise ValueError(f"unknown strategy {name!r}")


def make_strategy(cfg: TrainConfig) -> Strategy:
    """The strategy ``cfg.strategy`` with the run's precision, not yet initialised (``init()``)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return strategy_class(cfg.strategy)(cfg, Precision(cfg.optim.precision, device))
