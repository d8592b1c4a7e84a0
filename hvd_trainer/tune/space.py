"""From a trial's parameters to the training config it runs (pure but for reading the base)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..config import TrainConfig, from_dict
from ..config.loading import read_tree, with_settings
from .study import Param, StudyConfig


def suggest(trial, space: dict[str, Param]) -> dict[str, Any]:
    """Ask an Optuna trial for one value of each searched key."""
    out: dict[str, Any] = {}
    for key, p in space.items():
        if p.choices is not None:
            out[key] = trial.suggest_categorical(key, p.choices)
        elif p.is_int:
            out[key] = trial.suggest_int(key, p.low, p.high, step=p.step or 1, log=p.log)
        else:
            out[key] = trial.suggest_float(key, float(p.low), float(p.high), step=p.step, log=p.log)
    return out


def base_path(study: StudyConfig, study_dir: Path) -> str:
    """The base config as ``read_tree`` takes it: a file relative to the study, or a name."""
    candidate = study_dir / study.base
    return str(candidate) if candidate.is_file() else study.base


def trial_tree(study: StudyConfig, study_dir: Path, params: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """The whole training config of one trial, as a tree: base, study overrides, the trial's
    parameters, then its own run dir (and resuming from it: a preempted trial continues)."""
    tree = with_settings(read_tree(base_path(study, study_dir)), study.overrides)
    tree = with_settings(tree, params)
    return with_settings(tree, {"run_dir": str(run_dir), "checkpoint.resume": "auto"})


def trial_config(study: StudyConfig, study_dir: Path, params: dict[str, Any], run_dir: Path) -> TrainConfig:
    """Validated (ConfigError names the key: a parameter may make the config invalid)."""
    return from_dict(trial_tree(study, study_dir, params, run_dir))
