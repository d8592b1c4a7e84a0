"""hvd-tune under real mpirun: trials packed into groups of the job, each on its own communicator;
the grid walked once; a NaN trial failed and the study finished; a pruned trial stopped on
every rank of its group at one step; a stopped study resumed without rerunning a finished
trial; a lost rank ending the study with the trial named."""
from __future__ import annotations

import re
import signal
import sys
import time
from pathlib import Path

import optuna
import pytest
import torch
import yaml

from conftest import BIN, REPO, assert_same, mpirun, summary
from mpi_jobs import mpirun_command
from running import RunningJob, metrics_rows

DRIVER = str(REPO / "tests" / "parallel" / "tune_driver.py")
BASE = {"epochs": 2, "runtime": {"progress": False}, "checkpoint": {"every_epochs": 0}}


def _study(tmp_path: Path, name: str = "s", **keys) -> Path:
    doc = {"name": name, "base": "digits", "overrides": dict(BASE), "sampler": "grid", "ranks_per_trial": 1,
           "dir": str(tmp_path / "study"),
           "space": {"optim.lr": {"choices": [0.01, 0.1]}, "batch_size": {"choices": [16, 64]}}}
    doc.update(keys)
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def _trials(tmp_path: Path, name: str = "s") -> list[optuna.trial.FrozenTrial]:
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    storage = JournalStorage(JournalFileBackend(str(tmp_path / "study" / "journal.log")))
    return optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)


def _trials_so_far(tmp_path: Path) -> list[optuna.trial.FrozenTrial]:
    """For polling a running study: none until its journal holds the study's record."""
    try:
        return _trials(tmp_path) if (tmp_path / "study" / "journal.log").exists() else []
    except KeyError:
        return []


def _tune(np: int, study: Path, *args: str, timeout: float = 240, env=None):
    return mpirun(np, [sys.executable, DRIVER, str(study), *args], timeout=timeout, env=env)


def _final_model(run_dir: Path) -> dict[str, torch.Tensor]:
    from hvd_trainer.checkpoint import load

    newest = sorted((run_dir / "checkpoints").glob("ckpt-step*.pt"))[-1]
    return load(newest)["model"]


def test_a_2x2_grid_on_two_groups_runs_every_point_once_and_the_best_reproduces(tmp_path):
    res = _tune(2, _study(tmp_path))
    trials = _trials(tmp_path)
    assert [t.state.name for t in trials] == ["COMPLETE"] * 4, res.output[-3000:]
    assert sorted((t.params["optim.lr"], t.params["batch_size"]) for t in trials) == \
        [(0.01, 16), (0.01, 64), (0.1, 16), (0.1, 64)]
    assert {tuple(t.user_attrs["ranks"]) for t in trials} == {(0,), (1,)}  # both groups took trials
    for t in trials:  # each in its own run dir, its summary the trial's value
        s = summary(Path(t.user_attrs["run_dir"]))
        assert Path(t.user_attrs["run_dir"]).name == f"trial-{t.number:04d}"
        assert s["final_test_accuracy"] == pytest.approx(t.value, abs=0) and s["world_size"] == 1
    best = max(trials, key=lambda t: t.value)
    folder = tmp_path / "study"
    assert f"trial {best.number}," in (folder / "best.yaml").read_text().splitlines()[0]
    for name in ("trials.csv", "trials.md", "plots/history.png", "plots/importance.png", "report/report.html"):
        assert (folder / name).is_file(), name
    # hvd-train accepts best.yaml, and trained alone it reproduces the trial
    alone = mpirun(1, [str(BIN / "hvd-train"), str(folder / "best.yaml"), f"run_dir={tmp_path / 'alone'}"])
    assert summary(tmp_path / "alone")["final_test_accuracy"] == best.value, alone.output[-2000:]
    assert_same(_final_model(tmp_path / "alone"), _final_model(Path(best.user_attrs["run_dir"])), exact=True)


@pytest.mark.parametrize("strategy", ["horovod", "ddp", "ps"])
def test_two_groups_train_at_the_same_time_and_their_collectives_never_mix(tmp_path, strategy):
    # 4 ranks, 2 groups of 2: two Horovod worlds on sub-communicators (two DDP process groups;
    # two worker-server pairs), each exchanging over its own pair at the same time. Each trial
    # must equal the same config trained alone on 2 ranks: one collective crossing groups
    # would average the wrong gradients.
    study = _study(tmp_path, ranks_per_trial=2, space={"optim.lr": {"choices": [0.02, 0.2]}},
                   overrides={**BASE, "epochs": 3, "strategy": strategy})
    _tune(4, study, timeout=300, env={"TUNE_STEP_SLEEP": "0.005"})
    trials = _trials(tmp_path)
    assert [t.state.name for t in trials] == ["COMPLETE"] * 2
    assert {tuple(t.user_attrs["ranks"]) for t in trials} == {(0, 1), (2, 3)}
    a, b = trials
    assert a.datetime_start < b.datetime_complete and b.datetime_start < a.datetime_complete  # overlapped
    for t in trials:
        run = Path(t.user_attrs["run_dir"])
        assert summary(run)["world_size"] == 2
        mpirun(2, [str(BIN / "hvd-train"), str(run / "config.yaml"), f"run_dir={tmp_path / f'alone{t.number}'}"])
        assert_same(_final_model(tmp_path / f"alone{t.number}"), _final_model(run), exact=True)


def test_a_diverging_trial_fails_and_the_study_goes_on(tmp_path):
    study = _study(tmp_path, space={"optim.lr": {"choices": [0.05, 1e4]}, "batch_size": {"choices": [16]}})
    res = _tune(2, study)
    states = {t.params["optim.lr"]: t for t in _trials(tmp_path)}
    assert states[1e4].state.name == "FAIL" and states[1e4].user_attrs["why"].startswith("diverged:")
    assert "non-finite" in states[1e4].user_attrs["why"]
    assert states[0.05].state.name == "COMPLETE", res.output[-3000:]
    assert yaml.safe_load((tmp_path / "study" / "best.yaml").read_text())["optim"]["lr"] == 0.05


def test_an_invalid_trial_config_fails_that_trial_only(tmp_path):
    study = _study(tmp_path, space={"batch_size": {"choices": [16, 0]}})
    _tune(2, study)
    by_size = {t.params["batch_size"]: t for t in _trials(tmp_path)}
    assert by_size[0].state.name == "FAIL" and by_size[0].user_attrs["why"].startswith("config error: batch_size")
    assert by_size[16].state.name == "COMPLETE"


def test_an_asha_pruned_trial_stops_on_every_rank_of_its_group_at_one_step(tmp_path):
    # one group of 2 ranks, trials one after another: a trial worse at epoch 1 than the best so
    # far is pruned there (reduction factor 2). The grid's seed fixes the order of the points.
    study = _study(tmp_path, ranks_per_trial=2, pruner="asha", min_epochs=1, reduction_factor=2,
                   space={"optim.lr": {"choices": [0.1, 0.0003, 0.05, 0.0001]}},
                   overrides={**BASE, "epochs": 3})
    res = _tune(2, study)
    trials = _trials(tmp_path)
    pruned = [t for t in trials if t.state.name == "PRUNED"]
    assert pruned and any(t.state.name == "COMPLETE" for t in trials), [t.state for t in trials]
    for t in pruned:
        said = re.findall(rf"hvd-tune: trial {t.number}: rank (\d) stops at step (\d+):", res.stderr)
        steps = {int(step) for _, step in said}
        assert sorted(r for r, _ in said) == ["0", "1"] and len(steps) == 1, said  # both ranks, one step
        s = summary(Path(t.user_attrs["run_dir"]))
        assert s["steps"] == steps.pop() and s["epochs"] < 3 and s["stopped_by"].startswith("pruned after epoch")
        assert t.user_attrs["why"] == s["stopped_by"]


def test_a_stopped_study_resumes_its_running_trials_and_reruns_no_finished_one(tmp_path):
    study = _study(tmp_path, overrides={**BASE, "epochs": 3})
    pause = tmp_path / "pause"
    pause.touch()
    env = {"TUNE_STEP_SLEEP": "0.01", "TUNE_PAUSE_FILE": str(pause)}
    with RunningJob(mpirun_command(2, [sys.executable, DRIVER, str(study)]), env=env,
                    program_marker="tune_driver.py") as job:
        ranks = job.ranks(2)

        def one_done_and_the_next_under_way() -> bool:
            done = [t for t in _trials_so_far(tmp_path) if t.state.name == "COMPLETE"]
            return bool(done) and any(metrics_rows(d) >= 1 and not (d / "summary.json").exists()
                                      for d in (tmp_path / "study").glob("trial-*"))

        job.wait_for("a finished trial and one under way", one_done_and_the_next_under_way)
        for proc in ranks.values():
            proc.send_signal(signal.SIGUSR1)
        code = job.wait(120)
    assert code == 75, f"exit {code}\n{job.output[-3000:]}"
    before = {t.number: t for t in _trials(tmp_path)}
    finished = {n: t for n, t in before.items() if t.state.is_finished()}
    running = {n: t for n, t in before.items() if t.state.name == "RUNNING"}
    assert finished and running, {n: t.state for n, t in before.items()}
    rows = {n: metrics_rows(Path(t.user_attrs["run_dir"])) for n, t in finished.items()}

    pause.unlink()
    res = _tune(2, study)
    after = {t.number: t for t in _trials(tmp_path)}
    assert len(after) == 4 and all(t.state.name == "COMPLETE" for t in after.values()), res.output[-3000:]
    for n, t in finished.items():  # not rerun: the same record, no new rows
        assert after[n].datetime_complete == t.datetime_complete and after[n].value == t.value
        assert metrics_rows(Path(t.user_attrs["run_dir"])) == rows[n]
        assert f"hvd-tune: trial {n}: on job ranks" not in res.stderr
    for n in running:  # resumed from the stop's checkpoint
        run = Path(after[n].user_attrs["run_dir"])
        assert summary(run)["resumed_from_step"] > 0
        assert f"[trial {n}] resumed from {run / 'checkpoints'}" in res.stdout, res.stdout[-3000:]


def test_a_group_with_nothing_left_outlives_a_stop_signal_while_another_checkpoints(tmp_path):
    # one short trial and one long one: the short one's group is done and waiting when the
    # signal reaches every rank; it must not die of it, and the long trial must stop with its
    # checkpoint (exit 75), not be killed along with the job
    study = _study(tmp_path, space={"epochs": {"choices": [1, 40]}})
    with RunningJob(mpirun_command(2, [sys.executable, DRIVER, str(study)]), env={"TUNE_STEP_SLEEP": "0.005"},
                    program_marker="tune_driver.py") as job:
        ranks = job.ranks(2)

        def short_done_long_under_way() -> bool:
            trials = {t.params["epochs"]: t for t in _trials_so_far(tmp_path)}
            return 1 in trials and trials[1].state.name == "COMPLETE" and 40 in trials and \
                metrics_rows(tmp_path / "study" / f"trial-{trials[40].number:04d}") >= 1

        job.wait_for("the short trial done and the long one under way", short_done_long_under_way)
        time.sleep(0.5)  # the short trial's group is in its wait
        for proc in ranks.values():
            proc.send_signal(signal.SIGUSR1)
        code = job.wait(120)
    assert code == 75, f"exit {code}\n{job.output[-3000:]}"
    long = next(t for t in _trials(tmp_path) if t.params["epochs"] == 40)
    assert long.state.name == "RUNNING" and "SIGUSR1" in long.user_attrs["last_stop"], long.user_attrs
    assert list((Path(long.user_attrs["run_dir"]) / "checkpoints").glob("ckpt-step*.pt"))


def test_a_frozen_rank_ends_the_study_naming_the_trial_and_rank(tmp_path):
    study = _study(tmp_path, ranks_per_trial=2, space={"optim.lr": {"choices": [0.05]}},
                   overrides={**BASE, "epochs": 50, "runtime": {"progress": False, "peer_timeout_s": 5.0}})
    with RunningJob(mpirun_command(2, [sys.executable, DRIVER, str(study)]), env={"TUNE_STEP_SLEEP": "0.005"},
                    program_marker="tune_driver.py") as job:
        ranks = job.ranks(2)
        job.wait_for("an epoch", lambda: metrics_rows(tmp_path / "study" / "trial-0000") >= 1)
        ranks[1].send_signal(signal.SIGSTOP)  # frozen: only the group's heartbeat can tell
        code = job.wait(90)
    assert code not in (None, 0), job.output[-3000:]
    assert "lost trial 0, rank 1 (job rank 1) on host" in job.stderr, job.stderr[-3000:]


def test_a_bad_study_file_is_one_line_and_exit_2_on_every_rank(tmp_path):
    study = _study(tmp_path, space={"optim.lr": {"low": 1.0, "high": 0.1}})
    res = mpirun(2, [sys.executable, DRIVER, str(study)], check=False, timeout=60)
    assert res.returncode == 2
    lines = [line for line in res.stderr.splitlines() if "config error" in line]
    assert lines == ["hvd-tune: config error: space.optim.lr.low: 1.0 must be below high (0.1)"], res.stderr
    assert not (tmp_path / "study").exists()


def test_a_frozen_one_rank_trial_is_named_by_the_jobs_heartbeat(tmp_path):
    # groups of 1 rank have no peer inside their trial: the study's own heartbeat over the job
    # notices the frozen rank, names its trial from the journal, and ends the job (no hang)
    study = _study(tmp_path, space={"optim.lr": {"choices": [0.05, 0.1]}},
                   overrides={**BASE, "epochs": 50, "runtime": {"progress": False, "peer_timeout_s": 5.0}})
    with RunningJob(mpirun_command(2, [sys.executable, DRIVER, str(study)]), env={"TUNE_STEP_SLEEP": "0.005"},
                    program_marker="tune_driver.py") as job:
        ranks = job.ranks(2)
        job.wait_for("an epoch of both trials", lambda: all(
            metrics_rows(tmp_path / "study" / f"trial-{n:04d}") >= 1 for n in (0, 1)))
        ranks[1].send_signal(signal.SIGSTOP)
        code = job.wait(90)
    assert code not in (None, 0), job.output[-3000:]
    frozen = next(t for t in _trials(tmp_path) if t.user_attrs.get("ranks") == [1])
    assert f"lost job rank 1 (trial {frozen.number}) on host" in job.stderr, job.stderr[-3000:]
