"""One trial on every rank of its group: the same ``train()`` as ``hvd-train``, with the pruner
asked after each epoch, and the way it ended turned into an Optuna state.

Rank 0 of the group holds the Optuna trial: it reports each epoch's metric, asks the pruner,
and broadcasts the verdict, so every rank stops at the same step. A config a parameter made
invalid, or a run that diverged (NaN), fails the trial and the study goes on; a stop signal
leaves the trial running in the journal, to be resumed from its checkpoint.
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from ..config import ConfigError, TrainConfig
from ..runtime.errors import NonFiniteError, Preempted
from .study import StudyConfig

COMPLETE, PRUNED, FAILED, PREEMPTED = "complete", "pruned", "failed", "preempted"


@dataclass
class Outcome:
    state: str
    value: Optional[float] = None
    reason: str = ""
    summary: dict[str, Any] = field(default_factory=dict)
    wall_s: float = 0.0

    def describe(self, metric: str) -> str:
        """The line hvd-tune prints when a trial ends."""
        return self.state + (f" {metric}={self.value:.4f}" if self.value is not None else "") \
            + (f" ({self.reason})" if self.reason else "")


def pruning_hook(handle, metric: str, say: Callable[[str], None]):
    """The loop's ``on_epoch``: rank 0 reports ``metric`` and asks the pruner; all get its word."""

    def on_epoch(trainer, evaluation: dict[str, float]) -> Optional[str]:
        strategy, epoch = trainer.strategy, trainer.state.epoch
        verdict = None
        if strategy.rank == 0 and handle is not None:
            value = float(evaluation[metric])
            if math.isfinite(value):
                handle.report(value, epoch)
                if handle.should_prune():
                    verdict = f"pruned after epoch {epoch} ({metric} {value:.4f})"
        verdict = strategy.broadcast_object(verdict)
        if verdict:
            say(f"rank {strategy.rank} stops at step {trainer.state.step}: {verdict}")
        return verdict

    return on_epoch


def run_point(study: StudyConfig, base_dir: Path, params: dict[str, Any], run_dir: Path, handle,
              say: Callable[[str], None]) -> Outcome:
    """Every rank of the group: the trial's config from ``params``, written beside its results,
    then :func:`run_trial` (a config the parameters made invalid fails the trial)."""
    import yaml

    from ..runtime import world
    from .space import trial_config, trial_tree

    try:
        train_cfg = trial_config(study, base_dir, params, run_dir)
    except ConfigError as err:  # the same verdict on every rank
        return Outcome(FAILED, reason=f"config error: {err}")
    if world.comm().Get_rank() == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        tree = trial_tree(study, base_dir, params, run_dir)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(tree, sort_keys=False), encoding="utf-8")
    return run_trial(train_cfg, study.metric, handle, say)


def run_trial(cfg: TrainConfig, metric: str, handle, say: Callable[[str], None]) -> Outcome:
    """Every rank of the group; returns how the trial ended (rank 0's view is the record)."""
    from ..runner import train  # torch, MPI and the strategies only once a trial runs

    t0 = time.perf_counter()
    try:
        summary = train(cfg, on_epoch=pruning_hook(handle, metric, say))
    except ConfigError as err:
        return Outcome(FAILED, reason=f"config error: {err}", wall_s=time.perf_counter() - t0)
    except NonFiniteError as err:
        return Outcome(FAILED, reason=f"diverged: {err}", wall_s=time.perf_counter() - t0)
    except Preempted as err:
        return Outcome(PREEMPTED, reason=err.message, wall_s=time.perf_counter() - t0)
    wall = time.perf_counter() - t0
    if not summary:  # a parameter-server rank: the workers hold the record
        return Outcome(COMPLETE, wall_s=wall)
    if summary.get("stopped_by"):
        return Outcome(PRUNED, reason=summary["stopped_by"], summary=summary, wall_s=wall)
    value = summary.get(f"final_{metric}")
    if value is None or not math.isfinite(value):
        return Outcome(FAILED, reason=f"no finite final {metric}", summary=summary, wall_s=wall)
    return Outcome(COMPLETE, value=float(value), summary=summary, wall_s=wall)


def record(study, handle, outcome: Outcome, run_dir: str, ranks: list[int]) -> None:
    """Rank 0 of the group: the outcome into the journal (a preempted trial stays running)."""
    from optuna.trial import TrialState

    frozen = study._storage.get_trial(handle._trial_id)  # noqa: SLF001 - the user attrs so far
    wall = float(frozen.user_attrs.get("wall_s", 0.0)) + outcome.wall_s
    attrs = {"run_dir": run_dir, "wall_s": round(wall, 2), "ranks": ranks,
             "epochs": outcome.summary.get("epochs"), "steps": outcome.summary.get("steps")}
    if outcome.reason:
        attrs["why" if outcome.state != PREEMPTED else "last_stop"] = outcome.reason
    for key, value in attrs.items():
        if value is not None:
            handle.set_user_attr(key, value)
    if outcome.state == COMPLETE and outcome.value is not None:
        study.tell(handle, outcome.value)
    elif outcome.state == PRUNED:
        study.tell(handle, state=TrialState.PRUNED)
    elif outcome.state != PREEMPTED:  # failed, or no metric on this rank (it holds a PS server)
        if outcome.state == COMPLETE:
            handle.set_user_attr("why", "the recording rank has no metric (a parameter-server rank)")
        study.tell(handle, state=TrialState.FAIL)


def printer(label: str) -> Callable[[str], None]:
    def say(msg: str) -> None:
        # one write: lines of the ranks sharing a launcher's stderr must not interleave
        sys.stderr.write(f"hvd-tune: {label}: {msg}\n")
        sys.stderr.flush()
    return say
