"""hvd-tune's pure parts: the study file, the search space, packing, claiming trials from a shared
journal, the results, and the srun mode's commands (no MPI, no training)."""
from __future__ import annotations

import signal
import threading
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState, create_trial

from hvd_trainer.config import ConfigError
from hvd_trainer.runtime.control import StopSignals
from hvd_trainer.tune import results, storage
from hvd_trainer.tune.packed import deal, groups_of
from hvd_trainer.tune.space import suggest, trial_config, trial_tree
from hvd_trainer.tune.srun import slots, step_command
from hvd_trainer.tune.study import StudyConfig, load_study

SPACE = {"optim.lr": {"choices": [0.01, 0.1]}, "batch_size": {"choices": [16, 64]}}


def _write(tmp_path: Path, **keys) -> Path:
    doc = {"name": "s", "base": "digits", "space": SPACE, "dir": str(tmp_path / "study")}
    doc.update(keys)
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.mark.parametrize("keys, message", [
    ({"space": {"optim.lr": {"low": 1.0, "high": 0.1}}}, "space.optim.lr.low: 1.0 must be below high (0.1)"),
    ({"space": {"optim.lr": {"low": 0.0, "high": 1.0, "log": True}}}, "space.optim.lr.log: needs low > 0"),
    ({"space": {"optim.lr": {"choices": [0.1], "low": 0.0}}}, "space.optim.lr.choices: give choices, or low/high"),
    ({"space": {"optim.lr": {"choices": []}}}, "space.optim.lr.choices: at least one value"),
    ({"space": {}}, "space: name at least one key to search"),
    ({"sampler": "grid", "space": {"optim.lr": {"low": 0.1, "high": 1.0}}},
     "space.optim.lr: a grid needs choices, an integer range, or a step"),
    ({"sampler": "bayes"}, "sampler: input should be"),
    ({"ranks_per_trial": 0}, "ranks_per_trial: input should be greater than or equal to 1"),
    ({"pruner": "median"}, "pruner: input should be"),
    ({"trails": 4}, "trails: unknown key"),
])
def test_a_bad_study_file_is_one_line_naming_the_key(tmp_path, keys, message):
    with pytest.raises(ConfigError) as err:
        load_study(_write(tmp_path, **keys))
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_grids_and_trial_counts():
    cfg = StudyConfig.model_validate({"sampler": "grid", "space": {
        "a": {"low": 1, "high": 7, "step": 3}, "b": {"low": 0.1, "high": 0.3, "step": 0.1}, "c": {"choices": ["x"]}}})
    assert cfg.grid_space() == {"a": [1, 4, 7], "b": [0.1, 0.2, 0.3], "c": ["x"]}
    assert cfg.trial_count() == 9
    assert cfg.model_copy(update={"trials": 4}).trial_count() == 4  # a cap below the grid's size
    assert StudyConfig.model_validate({"space": SPACE}).trial_count() == 10  # random/tpe default
    assert StudyConfig.model_validate({"space": SPACE, "metric": "test_loss"}).goal == "minimize"


def test_study_overrides_merge_into_the_file(tmp_path):
    cfg, base_dir = load_study(_write(tmp_path, overrides={"epochs": 3}), {"overrides": {"batch_size": 8}, "trials": 2})
    assert cfg.overrides == {"epochs": 3, "batch_size": 8} and cfg.trials == 2 and base_dir == tmp_path


def test_a_trial_config_is_base_then_study_then_trial_then_its_run_dir(tmp_path):
    (tmp_path / "base.yaml").write_text(yaml.safe_dump({"epochs": 9, "batch_size": 4, "optim": {"lr": 0.5}}))
    cfg = StudyConfig.model_validate({"base": "base.yaml", "overrides": {"epochs": 2, "batch_size": 8}, "space": SPACE})
    train = trial_config(cfg, tmp_path, {"batch_size": 64, "optim.lr": 0.1}, tmp_path / "t")
    assert (train.epochs, train.batch_size, train.optim.lr) == (2, 64, 0.1)
    assert train.run_dir == str(tmp_path / "t") and train.checkpoint.resume == "auto"
    assert trial_tree(cfg, tmp_path, {}, tmp_path / "t")["batch_size"] == 8
    with pytest.raises(ConfigError, match="^batch_size"):
        trial_config(cfg, tmp_path, {"batch_size": 0}, tmp_path / "t")


def test_the_job_splits_into_groups_and_interrupted_trials_are_dealt_round_robin():
    assert groups_of(6, 2) == [[0, 1], [2, 3], [4, 5]]
    assert groups_of(3, 1) == [[0], [1], [2]]
    with pytest.raises(ConfigError, match="ranks_per_trial: 4 does not divide the job's 6 ranks"):
        groups_of(6, 4)
    assert deal([3, 5, 8], 2) == [[3, 8], [5]]
    assert deal([], 3) == [[], [], []]


def test_suggest_uses_each_params_kind():
    cfg = StudyConfig.model_validate({"space": {"lr": {"low": 1e-3, "high": 1.0, "log": True},
                                                "w": {"low": 8, "high": 64, "step": 8}, "opt": {"choices": ["sgd", "adam"]}}})
    trial = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1)).ask()
    got = suggest(trial, cfg.space)
    assert 1e-3 <= got["lr"] <= 1.0 and got["w"] in range(8, 65, 8) and got["opt"] in ("sgd", "adam")
    assert trial.distributions["lr"].log and trial.distributions["w"].step == 8


def test_two_leaders_sharing_a_journal_walk_the_grid_once_and_stop_at_the_count(tmp_path):
    cfg = StudyConfig.model_validate({"name": "g", "sampler": "grid", "space": SPACE})
    leaders = [storage.open_study(cfg, tmp_path, stream=s) for s in (0, 1)]  # two processes' views
    points = []
    for i in range(6):
        study = leaders[i % 2]
        trial = storage.next_trial(study, cfg, tmp_path, deadline=None)
        if trial is None:
            break
        points.append(tuple(suggest(trial, cfg.space).values()))
    assert sorted(points) == [(0.01, 16), (0.01, 64), (0.1, 16), (0.1, 64)]  # each once, while all run
    assert storage.next_trial(leaders[0], cfg, tmp_path, deadline=None) is None
    assert [t.number for t in storage.interrupted(leaders[1])] == [0, 1, 2, 3]  # all still running


def test_tpe_leaders_seeded_per_group_propose_different_points(tmp_path):
    cfg = StudyConfig.model_validate({"name": "t", "space": {"x": {"low": 0.0, "high": 1.0}}})
    a, b = (storage.open_study(cfg, tmp_path, stream=s) for s in (0, 1))
    xa = suggest(storage.next_trial(a, cfg, tmp_path, None), cfg.space)["x"]
    xb = suggest(storage.next_trial(b, cfg, tmp_path, None), cfg.space)["x"]
    assert xa != xb


def test_an_interrupted_trial_is_resumed_with_its_own_parameters(tmp_path):
    cfg = StudyConfig.model_validate({"name": "r", "space": {"x": {"low": 0.0, "high": 1.0}}})
    study = storage.open_study(cfg, tmp_path)
    first = storage.next_trial(study, cfg, tmp_path, None)
    x = suggest(first, cfg.space)["x"]
    again = storage.open_study(cfg, tmp_path)  # a requeued job
    handle = storage.resume_trial(again, first.number)
    assert handle.params == {"x": x} and suggest(handle, cfg.space)["x"] == x
    handle.report(0.5, 1)
    again.tell(handle, 0.7)
    assert storage.interrupted(storage.open_study(cfg, tmp_path)) == []


def _finished_study() -> optuna.Study:
    study = optuna.create_study(direction="maximize")
    dists = {"optim.lr": FloatDistribution(0.001, 1.0, log=True), "batch_size": CategoricalDistribution([16, 64])}
    for lr, bs, value, state in [(0.01, 16, 0.9, TrialState.COMPLETE), (0.1, 64, 0.95, TrialState.COMPLETE),
                                 (0.5, 16, None, TrialState.FAIL), (0.002, 64, 0.3, TrialState.PRUNED)]:
        study.add_trial(create_trial(params={"optim.lr": lr, "batch_size": bs}, distributions=dists, value=value,
                                     state=state, intermediate_values={1: value or 0.0},
                                     user_attrs={"epochs": 2, "steps": 40, "wall_s": 1.5, "ranks": [0, 1],
                                                 **({"why": "diverged: x"} if state == TrialState.FAIL else {})}))
    return study


def test_results_hold_every_trial_and_best_yaml_is_a_training_config(tmp_path):
    cfg = StudyConfig.model_validate({"name": "r", "space": SPACE, "overrides": {"epochs": 2}})
    out = results.write_results(_finished_study(), cfg, tmp_path, tmp_path)
    assert [r["state"] for r in out["rows"]] == ["complete", "complete", "fail", "pruned"]
    assert out["rows"][2]["why"] == "diverged: x"
    text = (tmp_path / "trials.md").read_text()
    assert "| trial | state | test_accuracy |" in text and "optim.lr=0.1 batch_size=64" in text
    best = (tmp_path / "best.yaml").read_text()
    assert best.startswith("# study r: trial 1, test_accuracy 0.95 on 2 rank(s)")
    from hvd_trainer.config import from_dict
    train = from_dict(yaml.safe_load(best))
    assert (train.optim.lr, train.batch_size, train.epochs) == (0.1, 64, 2)
    assert {p.name for p in out["plots"]} >= {"history.png", "slice.png"}


def test_no_best_yaml_without_a_complete_trial(tmp_path):
    cfg = StudyConfig.model_validate({"name": "r", "space": SPACE})
    study = optuna.create_study()
    assert results.best_yaml(study, cfg, tmp_path, tmp_path) is None and not (tmp_path / "best.yaml").exists()


def test_srun_mode_needs_an_allocation_and_starts_exact_steps():
    cfg = StudyConfig.model_validate({"space": SPACE, "ranks_per_trial": 2, "launch": "srun", "srun_args": ["--mem=1G"]})
    assert slots(cfg, {"SLURM_NTASKS": "8"}) == 4
    with pytest.raises(ConfigError, match="^launch: srun runs inside a SLURM allocation"):
        slots(cfg, {})
    with pytest.raises(ConfigError, match="^ranks_per_trial: 2 is more than the allocation's 1 tasks"):
        slots(cfg, {"SLURM_NTASKS": "1"})
    cmd = step_command(cfg, "s.yaml", ["trials=3"], 7, {"optim.lr": 0.1})
    assert cmd[:7] == ["srun", "--ntasks=2", "--mpi=pmix", "--cpus-per-task=1", "--exact", "--kill-on-bad-exit=1",
                       "--job-name=trial-7"]
    assert cmd[7] == "--mem=1G"
    assert cmd[-3:] == ["7", '{"optim.lr": 0.1}', "trials=3"] and cmd[-4].endswith("s.yaml")


def test_a_stop_caught_by_an_outer_catcher_reaches_the_inner_one_and_back():
    assert threading.current_thread() is threading.main_thread()
    outer = StopSignals(["USR2"])
    try:
        signal.raise_signal(signal.SIGUSR2)  # between two trials
        inner = StopSignals(["USR2"])
        assert inner.received == "SIGUSR2"  # the trial starting now stops at its first step
        inner.restore()
        outer.received = None
        inner = StopSignals(["USR2"])
        signal.raise_signal(signal.SIGUSR2)  # during a trial
        assert inner.received == outer.received == "SIGUSR2"
        inner.restore()
    finally:
        outer.restore()


def test_no_trial_starts_after_the_time_budget(tmp_path):
    import time as _time
    cfg = StudyConfig.model_validate({"name": "b", "space": SPACE, "trials": 50})
    study = storage.open_study(cfg, tmp_path)
    assert storage.next_trial(study, cfg, tmp_path, deadline=_time.monotonic() + 60) is not None
    assert storage.next_trial(study, cfg, tmp_path, deadline=_time.monotonic() - 1) is None
    assert len(study.get_trials()) == 1


@pytest.mark.parametrize("sampler, pruner", [("random", "hyperband"), ("tpe", "asha")])
def test_the_configured_pruner_stops_the_worse_trials(tmp_path, sampler, pruner):
    # a curve that rises with x: the pruner the study file names must cut the low-x trials short
    cfg = StudyConfig.model_validate({"name": "p", "sampler": sampler, "pruner": pruner, "trials": 24,
                                      "min_epochs": 1, "reduction_factor": 3, "space": {"x": {"low": 0.0, "high": 1.0}}})
    study = storage.open_study(cfg, tmp_path)
    while (trial := storage.next_trial(study, cfg, tmp_path, None)) is not None:
        x = suggest(trial, cfg.space)["x"]
        for epoch in range(1, 10):
            trial.report(x * epoch / 9, epoch)
            if trial.should_prune():
                study.tell(trial, state=TrialState.PRUNED)
                break
        else:
            study.tell(trial, x)
    done = {state: [t.params["x"] for t in study.get_trials() if t.state == state]
            for state in (TrialState.COMPLETE, TrialState.PRUNED)}
    assert len(done[TrialState.PRUNED]) >= 6 and done[TrialState.COMPLETE], done
    assert sum(done[TrialState.COMPLETE]) / len(done[TrialState.COMPLETE]) > \
        sum(done[TrialState.PRUNED]) / len(done[TrialState.PRUNED])


def test_a_metric_the_base_never_scores_is_a_config_error_before_any_trial(tmp_path, capsys):
    from hvd_trainer.tune.cli import main

    assert main([str(_write(tmp_path, metric="test_perplexity"))]) == 2
    assert capsys.readouterr().err.strip() == ("hvd-tune: config error: metric: test_perplexity is scored on "
                                               "data.name: text only (the base trains on digits)")
    assert not (tmp_path / "study" / "journal.log").exists()


def test_a_resumed_random_study_does_not_draw_its_first_points_again(tmp_path):
    cfg = StudyConfig.model_validate({"name": "r", "sampler": "random", "trials": 6,
                                      "space": {"x": {"low": 0.0, "high": 1.0}}})

    def three() -> list[float]:
        study = storage.open_study(cfg, tmp_path)  # each call: the study run again (a requeue)
        points = []
        for _ in range(3):
            trial = storage.next_trial(study, cfg, tmp_path, None)
            points.append(suggest(trial, cfg.space)["x"])
            study.tell(trial, 0.0)
        return points

    first, second = three(), three()
    assert not set(first) & set(second), (first, second)
