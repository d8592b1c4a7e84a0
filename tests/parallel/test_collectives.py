"""The collectives tier: every strategy's small collectives in closed form, among 2 and 3
training ranks (the parameter server's among its workers: np 3 and 4 with one server).

A broken primitive fails here, under its own name, before it can fail deep inside a training run.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from conftest import mpirun

WORKER = str(Path(__file__).with_name("collectives_worker.py"))
CHECKS = {"allreduce_sum_float64", "allreduce_sum_float32", "allreduce_average", "broadcast_object_empty",
          "broadcast_object_small", "broadcast_object_several_mb", "broadcast_object_from_last_rank",
          "allgather_object_order", "broadcast_parameters_and_buffers"}


@pytest.mark.parametrize("strategy,np", [("horovod", 2), ("horovod", 3), ("ddp", 2), ("ddp", 3),
                                         ("ps", 3), ("ps", 4)])
def test_small_collectives_in_closed_form(tmp_path, strategy, np):
    # the parameter server's collectives run among its workers: np - 1 of them here, at least 2
    # (with one, an "allreduce" that returned its input would pass every closed form)
    mpirun(np, [sys.executable, WORKER, str(tmp_path), f"strategy={strategy}", "ps.num_servers=1"], timeout=120)
    training_ranks = np - 1 if strategy == "ps" else np
    assert training_ranks >= 2
    failures = {}
    for r in range(training_ranks):
        verdicts = json.loads((tmp_path / f"rank{r}.json").read_text())
        assert verdicts.keys() == CHECKS
        failures.update({f"rank {r}: {name}": v for name, v in verdicts.items() if v != "ok"})
    assert not failures, "\n".join(f"{k}: {v}" for k, v in failures.items())
    assert not (tmp_path / f"rank{np - 1}.json").exists() or strategy != "ps"  # the server has none
