"""The study in Optuna: its journal file (shared by every group leader), sampler and pruner, and
who takes the next trial.

Leaders of different groups ask for trials from separate processes. Each ask happens under a
file lock, so the trial count, the time budget and a grid's unvisited points are judged on a
journal no other leader is writing at that moment.
"""
from __future__ import annotations

import fcntl
import logging
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

import optuna
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import FrozenTrial, Trial, TrialState

from .space import suggest
from .study import StudyConfig


def study_dir(cfg: StudyConfig) -> Path:
    return Path(cfg.dir or f"runs/tune/{cfg.name}")


def trial_dir(folder: Path, number: int) -> Path:
    return folder / f"trial-{number:04d}"


class _Grid(optuna.samplers.GridSampler):
    """Optuna's grid, without its stop at the last point: that stop is only allowed inside
    ``study.optimize``, and here the trial count ends the search (``next_trial``)."""

    def after_trial(self, study, trial, state, values) -> None:
        pass


def make_sampler(cfg: StudyConfig, stream: int = 0, before: int = 0) -> optuna.samplers.BaseSampler:
    """``stream``: the asking group's number. Each leader holds its own sampler, and samplers
    seeded alike would propose the same random points side by side. ``before``: trials the
    journal already holds, so a resumed study does not draw its first run's points again."""
    if cfg.sampler == "grid":  # its seed orders the points: the same in every group
        return _Grid(cfg.grid_space(), seed=cfg.seed)
    seed = cfg.seed + stream + 10007 * before  # no two groups of one job alike, whenever they open
    if cfg.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    # constant_liar: trials running in other groups count as bad guesses, so concurrent
    # leaders do not all sample the same point
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=cfg.startup_trials, constant_liar=True)


def make_pruner(cfg: StudyConfig) -> optuna.pruners.BasePruner:
    if cfg.pruner == "asha":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=cfg.min_epochs,
                                                      reduction_factor=cfg.reduction_factor)
    if cfg.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=cfg.min_epochs, reduction_factor=cfg.reduction_factor)
    return optuna.pruners.NopPruner()


def open_study(cfg: StudyConfig, folder: Path, stream: int = 0) -> optuna.Study:
    """Create or load the study in ``folder/journal.log`` (any process, any time)."""
    optuna.logging.set_verbosity(logging.WARNING)
    folder.mkdir(parents=True, exist_ok=True)
    storage = JournalStorage(JournalFileBackend(str(folder / "journal.log")))
    before = sum(s.n_trials for s in optuna.get_all_study_summaries(storage, include_best_trial=False)
                 if s.study_name == cfg.name)
    return optuna.create_study(study_name=cfg.name, storage=storage, sampler=make_sampler(cfg, stream, before),
                               pruner=make_pruner(cfg), direction=cfg.goal, load_if_exists=True)


@contextmanager
def exclusive(folder: Path) -> Iterator[None]:
    with open(folder / "ask.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def interrupted(study: optuna.Study) -> list[FrozenTrial]:
    """Trials a previous run of the study left running (stopped by a signal, or by a crash):
    they continue from their checkpoints before any new trial starts."""
    return [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.RUNNING]


def next_trial(study: optuna.Study, cfg: StudyConfig, folder: Path, deadline: Optional[float]) -> Optional[Trial]:
    """A new trial, or None when the count or the time budget is used up (under the lock)."""
    with exclusive(folder):
        if deadline is not None and time.monotonic() >= deadline:
            return None
        if len(study.get_trials(deepcopy=False)) >= cfg.trial_count():
            return None
        return study.ask()


def claim(study: optuna.Study, cfg: StudyConfig, folder: Path, deadline: Optional[float],
          pending: list[int]) -> tuple[Optional[Trial], dict[str, Any]]:
    """The next trial to run and its parameters: the first of ``pending`` (interrupted trials,
    with their own parameters), else a new one, else ``(None, {})``."""
    if pending:
        handle = resume_trial(study, pending.pop(0))
        return handle, dict(handle.params)
    handle = next_trial(study, cfg, folder, deadline)
    return (None, {}) if handle is None else (handle, suggest(handle, cfg.space))


def resume_trial(study: optuna.Study, number: int) -> Trial:
    """A handle on trial ``number`` that a previous run started (to report to and finish)."""
    frozen = next(t for t in study.get_trials(deepcopy=False) if t.number == number)
    return Trial(study, frozen._trial_id)  # noqa: SLF001 - Optuna's handle takes the storage id
