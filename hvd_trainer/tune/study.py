"""A study file: the base training config, the search space, how to search and how to pack.

    name: digits-lr-width
    base: digits                  # a built-in config or a YAML file (relative to this file)
    overrides: {epochs: 4}        # applied to the base before any trial's parameters
    space:
      optim.lr: {low: 0.01, high: 1.0, log: true}
      model.hidden: {choices: [32, 128]}
    sampler: tpe                  # grid | random | tpe
    pruner: asha                  # none | asha | hyperband
    ranks_per_trial: 1
    trials: 12
    metric: test_accuracy

A bad study file is one line naming the key (``space.optim.lr.low: ...``), exit 2.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import Field, ValidationError, model_validator

from ..config import ConfigError
from ..config.base import INT_LIMIT, _FieldError, _Section
from ..config.loading import format_validation_error, merge_trees

Scalar = Union[bool, int, float, str]
# what each metric of an evaluation is best at, when the study does not say
DIRECTIONS = {"test_accuracy": "maximize", "test_loss": "minimize", "test_perplexity": "minimize"}


class Param(_Section):
    """One searched key: ``choices`` (categorical, and what a grid walks), or a ``low``..``high``
    range: integers when both ends are, else floats; ``log`` samples on a log scale; ``step``
    makes a float range discrete (a grid then walks its points)."""

    choices: Optional[list[Scalar]] = None
    low: Optional[Union[int, float]] = None
    high: Optional[Union[int, float]] = None
    log: bool = False
    step: Optional[Union[int, float]] = None

    @model_validator(mode="after")
    def _shape(self) -> "Param":
        if self.choices is not None:
            if self.low is not None or self.high is not None or self.step is not None or self.log:
                raise _FieldError("choices", "give choices, or low/high (with log, step): not both")
            if not self.choices:
                raise _FieldError("choices", "at least one value")
            return self
        if self.low is None or self.high is None:
            raise _FieldError("low", "give choices, or both low and high")
        if not self.low < self.high:
            raise _FieldError("low", f"{self.low} must be below high ({self.high})")
        if self.log and self.low <= 0:
            raise _FieldError("log", "needs low > 0")
        if self.log and self.step is not None:
            raise _FieldError("step", "log and step: choose one")
        if self.step is not None and not self.step > 0:
            raise _FieldError("step", "must be > 0")
        return self

    @property
    def is_int(self) -> bool:
        return self.choices is None and all(isinstance(v, int) for v in (self.low, self.high)) \
            and (self.step is None or isinstance(self.step, int))

    def grid(self) -> list[Scalar]:
        """The values a grid search walks (ConfigError when the range is continuous)."""
        if self.choices is not None:
            return list(self.choices)
        if self.is_int:
            return list(range(self.low, self.high + 1, self.step or 1))
        if self.step is None:
            raise ValueError("a grid needs choices, an integer range, or a step")
        n = int(math.floor((self.high - self.low) / self.step + 1e-9)) + 1
        return [round(self.low + i * self.step, 12) for i in range(n)]


class StudyConfig(_Section):
    name: str = "study"
    """The study's name in its journal (one journal file may hold several studies)."""
    base: str = "digits"
    """The training config every trial starts from: a built-in name or a YAML file (a relative
    path is taken from the study file's folder)."""
    overrides: dict[str, Any] = Field(default_factory=dict)
    """Dotted keys set on the base before a trial's own parameters (``epochs: 4``)."""
    space: dict[str, Param]
    """The searched keys (dotted, any training config key) and their ranges or choices."""
    sampler: Literal["grid", "random", "tpe"] = "tpe"
    seed: int = 0
    """The sampler's seed (the trials' own training seed is the base config's ``seed``)."""
    startup_trials: int = Field(4, ge=0, le=INT_LIMIT)
    """tpe: trials sampled at random before the model of good and bad regions is used."""
    pruner: Literal["none", "asha", "hyperband"] = "none"
    min_epochs: int = Field(1, ge=1, le=INT_LIMIT)
    """asha/hyperband: epochs every trial gets before it can be pruned (the smallest rung)."""
    reduction_factor: int = Field(3, ge=2, le=INT_LIMIT)
    """asha/hyperband: 1 in this many trials goes on from each rung."""
    ranks_per_trial: int = Field(1, ge=1, le=INT_LIMIT)
    """k: the job's N ranks form N/k groups, each running one trial at a time."""
    trials: int = Field(0, ge=0, le=INT_LIMIT)
    """How many trials in all (0: the grid's size for grid, else 10)."""
    time_budget_s: float = Field(0.0, ge=0)
    """No trial starts after this many seconds of the job (0: no limit)."""
    metric: Literal["test_accuracy", "test_loss", "test_perplexity"] = "test_accuracy"
    """Each epoch's held-out value, reported to the pruner; a trial's result is its last."""
    direction: Optional[Literal["maximize", "minimize"]] = None
    """Default: maximize accuracy, minimize loss and perplexity."""
    dir: str = ""
    """The study's folder (journal, trial run dirs, results). Default: runs/tune/<name>."""
    launch: Literal["packed", "srun"] = "packed"
    """packed: hvd-tune runs under mpirun/srun and its groups run trials in-process, each on its
    own communicator. srun: hvd-tune runs as one process in an allocation and starts each trial
    as an ``srun`` step of ranks_per_trial tasks."""
    srun_args: list[str] = Field(default_factory=list)
    """launch=srun: extra arguments for each trial's srun step (``--mpi=pmix`` and the task
    count are given already)."""

    @model_validator(mode="after")
    def _consistent(self) -> "StudyConfig":
        if not self.space:
            raise _FieldError("space", "name at least one key to search")
        if self.sampler == "grid":
            for key, param in self.space.items():
                try:
                    param.grid()
                except ValueError as err:
                    raise _FieldError(f"space.{key}", str(err)) from None
        return self

    @property
    def goal(self) -> str:
        return self.direction or DIRECTIONS[self.metric]

    def grid_space(self) -> dict[str, list[Scalar]]:
        return {key: param.grid() for key, param in self.space.items()}

    def trial_count(self) -> int:
        if self.sampler == "grid":
            size = math.prod(len(v) for v in self.grid_space().values())
            return min(self.trials, size) if self.trials else size
        return self.trials or 10


def load_study(path: str | Path, overrides: Optional[dict[str, Any]] = None) -> tuple[StudyConfig, Path]:
    """The study file's config and the folder relative paths in it are taken from."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"study: no file {str(path)!r}")
    try:
        tree = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ConfigError(f"study: {p} is not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"study: {p} must hold a mapping at the top level")
    tree = merge_trees(tree, overrides or {})
    try:
        study = StudyConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err)) from None
    return study, p.resolve().parent
