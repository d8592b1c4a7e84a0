"""``train()``: the one way in and out of a run, on every rank of the job.

Start: MPI defaults before MPI starts, the ranks' configs compared, the strategy up and checked,
this rank's role, the control plane. Then a parameter server serves, a training rank trains.
End: on success the trainer is closed and communication shut down; a config error (the same on
every rank) is raised after an orderly shutdown; a stop signal exits with a checkpoint; any other
failure in a multi-rank job prints its traceback and takes the whole job down, so no rank waits
for a dead peer.
"""
from __future__ import annotations

import gc
import sys
import traceback
from typing import Any, Callable, Optional

from torch import nn
from torch.utils.data import Dataset

from .config import ConfigError, TrainConfig, check_agreement
from .data.validation import BadSample
from .execution import LossFn
from .parallel.executor import check_pipeline, make_executor
from .runtime import world
from .runtime.control import ControlPlane, open_control_plane
from .runtime.errors import NonFiniteError, Preempted
from .runtime.launch_env import abort_job, apply_mpi_defaults, launched_by_mpi
from .strategies import make_strategy
from .trainer import EpochHook, Trainer


def _agree_on_config(cfg: TrainConfig) -> None:
    """Ranks launched with different configs (MPMD, a stale file on one node) would hang in
    mismatched collectives or train the wrong thing: compare them over plain MPI before any
    strategy starts. (Under horovodrun's Gloo controller the model/data check still runs.)"""
    if not launched_by_mpi():
        return
    check_agreement(world.comm().allgather(cfg.to_dict()), "config")


def train(cfg: TrainConfig, *, model: Optional[nn.Module] = None, train_data: Optional[Dataset] = None,
          test_data: Optional[Dataset] = None, loss_fn: Optional[LossFn] = None,
          on_end: Optional[Callable[[Trainer], Any]] = None,
          on_epoch: Optional[EpochHook] = None) -> dict[str, Any]:
    """Run ``cfg`` on this rank: every rank of the job calls it. Returns the run's summary on
    every training rank (rank 0's, which also lands in ``run_dir/summary.json``), ``{}`` on a
    parameter-server rank. ``on_end(trainer)`` runs on every training rank after the last step,
    before teardown (to save or inspect the final model). ``on_epoch(trainer, evaluation)``
    runs on every training rank after each epoch's evaluation and returns why to stop there, or
    None; it must give every rank the same answer (hvd-tune's pruner broadcasts its verdict)."""
    apply_mpi_defaults()
    _agree_on_config(cfg)
    strategy = make_strategy(cfg)
    strategy.init()
    control: Optional[ControlPlane] = None

    def teardown(reason: Optional[str] = None) -> None:
        strategy.executor.close()
        strategy.shutdown(reason=reason)
        if control is not None:  # after the strategy: a PS server finishes once the workers left
            control.close()

    try:
        type(strategy).check(cfg, strategy.size)
        check_pipeline(cfg, strategy.size, type(strategy).pipelines)
        strategy.executor = make_executor(cfg, strategy)
        duty = strategy.role()
        control = open_control_plane(size=strategy.size, is_training=duty is None,
                                     peer_timeout_s=cfg.runtime.peer_timeout_s,
                                     stop_signals=cfg.checkpoint.stop_signals, allreduce=strategy.allreduce)
        summary: dict[str, Any] = {}
        if duty is not None:
            duty()
        else:
            trainer = Trainer(cfg, strategy, model=model, train_data=train_data, test_data=test_data,
                              loss_fn=loss_fn, control=control, on_epoch=on_epoch)
            try:
                summary = trainer.fit()
                if on_end is not None:
                    on_end(trainer)
            finally:
                trainer.close()
                del trainer
                gc.collect()
    except BadSample as err:  # found on this rank alone: the others cannot know, so end the job
        if strategy.size <= 1:
            teardown(reason=str(err))  # a caller may go on (hvd-tune's next trial)
            raise
        print(f"hvd-train: {world.who(strategy.rank)}: config error: {err}", file=sys.stderr, flush=True)
        abort_job(2)
    except ConfigError as err:
        teardown(reason=str(err))
        raise
    except Preempted as err:  # every training rank, at the same step, after the checkpoint
        if strategy.rank == 0:
            print(f"hvd-train: {err.message}; exiting {err.code}", file=sys.stderr, flush=True)
        teardown()
        raise
    except NonFiniteError as err:
        if strategy.size <= 1 or (world.scope() is not None and type(strategy).agreed_nonfinite):
            teardown(reason=str(err))  # every rank of the run is here, at the same step
            raise
        print(f"hvd-train: {world.who(strategy.rank)}: {err}", file=sys.stderr, flush=True)
        abort_job(1)
    except BaseException as err:  # noqa: BLE001 - one failing rank must end the job, not hang it
        if strategy.size <= 1 or (isinstance(err, SystemExit) and not err.code):
            raise
        sys.stdout.flush()
        lost = control.lost_peers_message(strategy.rank) if control is not None else None
        if lost:  # a peer died or froze, and this rank's collective failed on it: name the cause
            print(f"hvd-train: {lost}", file=sys.stderr)
        print(f"hvd-train: {world.who(strategy.rank)} failed: {type(err).__name__}: {err}", file=sys.stderr)
        traceback.print_exc()
        sys.stderr.flush()
        abort_job(1)
    teardown()
    return summary
